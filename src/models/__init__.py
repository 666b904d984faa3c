"""Model loading for the cluster: which part of each mlx-lm model runs where."""
