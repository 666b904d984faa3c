"""The `mlx-cluster` command: start workers, a coordinator, or a whole local cluster."""
