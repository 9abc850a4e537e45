"""dare_lab.engine."""
