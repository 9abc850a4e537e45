"""dare_lab.tracking."""
