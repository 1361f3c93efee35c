"""Training: batching, the loop with early stopping, checkpoints, run records."""
