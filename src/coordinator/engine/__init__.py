"""The engine: worker clients, the chain of stages, requests, decode lanes, sampling.

No HTTP here: `Cluster` (cluster.py) is usable from Python alone.
"""
