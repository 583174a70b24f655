"""Training: the outer loop, checkpoints, metric sinks and progress display."""
