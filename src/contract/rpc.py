"""gRPC settings both sides must agree on."""

from __future__ import annotations

# Bumped when a message changes incompatibly; workers report it in Info.
PROTOCOL_VERSION = 1

# A prefill chunk of 2048 tokens of an 8192-wide bf16 model is 32 MiB; leave room.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Hidden states are latency-bound: keep the connection warm between tokens.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]

# The name the standard grpc.health.v1 service reports LayerService under.
LAYER_SERVICE_NAME = "mlx_cluster.v1.LayerService"

# Deadlines (seconds) for unary calls; Forward streams carry the request's own deadline.
INFO_DEADLINE_S = 10.0
SESSION_DEADLINE_S = 10.0
LOAD_DEADLINE_S = 600.0
