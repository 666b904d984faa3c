"""gRPC settings both sides must agree on."""

from __future__ import annotations

# Bumped when a message changes incompatibly; workers report it in Info.
PROTOCOL_VERSION = 1

# A prefill chunk of 2048 tokens of an 8192-wide bf16 model is 32 MiB; leave room.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for servers and channels; both ends must allow the same message size."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Hidden states are latency-bound: keep the connection warm between tokens.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


CHANNEL_OPTIONS = channel_options()

# The name the standard grpc.health.v1 service reports LayerService under.
LAYER_SERVICE_NAME = "mlx_cluster.v1.LayerService"

# Deadlines (seconds) for unary calls; Forward streams carry the request's own deadline.
INFO_DEADLINE_S = 10.0
SESSION_DEADLINE_S = 10.0
LOAD_DEADLINE_S = 600.0
