"""The HTTP API over a Cluster: FastAPI routers, one module per API family."""
