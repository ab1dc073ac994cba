"""Training of pruning gates: data, models, one-pass schedule and checkpoints."""
