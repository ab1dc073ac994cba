"""Serve the exported dense/pruned models on Triton and measure them (works from the model repository
on disk alone: no torch, no training or export imports)."""
