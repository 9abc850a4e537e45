"""dare_lab.analysis."""
