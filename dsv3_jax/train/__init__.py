"""Training: the explicit train state, the pure step, losses, metrics, checkpoints and the loop that drives them."""
