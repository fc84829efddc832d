"""Training: the loop, its step inputs, checkpoints, run folders, metrics and plots."""
