"""dare_lab.train."""
