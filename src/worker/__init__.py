"""The worker: a gRPC LayerService serving one slice of a model's layers."""
