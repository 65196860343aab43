"""Training: data, optimizer, steps, checkpoints, the loop and the command line."""
