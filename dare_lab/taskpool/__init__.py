"""dare_lab.taskpool."""
