"""Training: the loop, its step inputs, checkpoints, run folders, metrics, benchmarks and baselines."""
