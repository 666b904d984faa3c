"""Benchmarks of mlx-cluster, kept apart from the tests; see benchmarks/README.md."""
