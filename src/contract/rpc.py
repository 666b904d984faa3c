"""gRPC settings both sides must agree on.

Servers and clients take different option lists: `client_channel_options` for
channels (the coordinator's, the benchmarks'), `server_options` for servers
(workers). Both come from the same numbers, so that a server accepts the
keepalive pings its clients send.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

# Bumped when a message changes incompatibly; workers report it in Info.
# 2: Info reports the worker's limits; sessions belong to a coordinator's Lease.
# 3: the first stage embeds, the last samples; decoding runs as a ring (Decode).
# 4: decode steps verify drafts (speculative decoding) and rewind rejected ones.
# 5: sessions end kept as prefixes, and open from them (prefix cache).
# 6: prompt chunks relay from worker to worker, pipelined; failures may come in band;
#    sessions may sample under a grammar (SamplingSpec.grammar, constrained decoding).
# 7: weights travel to workers (WeightService: HaveWeights, PutWeights).
PROTOCOL_VERSION = 7

try:  # the package's version, which Info (and Ollama's /api/version) report
    from importlib.metadata import version as _dist_version

    PACKAGE_VERSION = _dist_version("mlx-cluster")
except Exception:  # running from a source tree without an install
    PACKAGE_VERSION = "0.0.0+source"

# A prefill chunk of 2048 tokens of an 8192-wide bf16 model is 32 MiB; leave room.
MIB = 1024 * 1024
MAX_MESSAGE_BYTES = 256 * MIB

# Clients ping every connection this often, and drop it when a ping goes unanswered this
# long: a frozen worker or a link that silently drops is noticed within the two together
# (the coordinator's own numbers come from its config's `liveness` section).
KEEPALIVE_TIME_MS = 5_000
KEEPALIVE_TIMEOUT_MS = 5_000
# The shortest ping interval gRPC clients keep to; servers accept pings this often.
MIN_KEEPALIVE_TIME_MS = 1_000
# A channel whose worker went away tries to reconnect at least this often, so that a
# restarted worker is found within a second (gRPC's default backoff grows to 120 s).
MAX_RECONNECT_BACKOFF_MS = 1_000

# Servers ping their clients too: a coordinator host that vanished without closing its
# connections (power loss, a cut cable) is noticed in about 10 s, and its lease with it.
SERVER_KEEPALIVE_TIME_MS = 5_000
SERVER_KEEPALIVE_TIMEOUT_MS = 5_000


def _keepalive(time_ms: int, timeout_ms: int) -> list[tuple[str, int]]:
    """Ping every `time_ms`, with or without calls or data; drop the connection (failing
    its calls with UNAVAILABLE) when a ping is unanswered for `timeout_ms`.

    grpcio (1.85) times a keepalive ping out by "grpc.http2.ping_timeout_ms" (default
    60 s): "grpc.keepalive_timeout_ms" alone is not honoured. Measured on a SIGSTOPped
    worker with 2 s / 2 s: a blocked stream fails after 4 s with both set, 62 s without
    the first (tests/test_chaos_workers.py checks the bound).
    """
    return [
        ("grpc.keepalive_time_ms", time_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def client_channel_options(
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    keepalive_time_ms: int = KEEPALIVE_TIME_MS,
    keepalive_timeout_ms: int = KEEPALIVE_TIMEOUT_MS,
) -> list[tuple[str, int]]:
    """Options for client channels; `max_message_bytes` must match the server's."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        # Hidden states are latency-bound: keep the connection warm between tokens, and
        # notice a dead worker while a long Forward step keeps the stream silent.
        *_keepalive(keepalive_time_ms, keepalive_timeout_ms),
    ]


def server_options(
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    client_keepalive_time_ms: int = MIN_KEEPALIVE_TIME_MS,
) -> list[tuple[str, int]]:
    """Options for servers: accept the pings of clients using `client_channel_options`.

    By default a gRPC server wants at least 5 minutes between pings on a connection
    that sends no data, and after 2 pings that come sooner it ends the connection with
    GOAWAY "too_many_pings". A Forward step that keeps its stream silent for a few
    client keepalive intervals (a long prefill on a slow CPU) would then be cut off.
    By default pings are accepted as often as any gRPC client sends them, so the
    coordinator's configured interval needs no worker setting.
    """
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # The least time between pings on a silent connection before a ping counts as a
        # strike (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; the often seen
        # "grpc.http2.min_recv_ping_interval_without_data_ms" is no gRPC option and is
        # ignored). Half the clients' interval, so that timer jitter never makes one early.
        ("grpc.http2.min_ping_interval_without_data_ms", client_keepalive_time_ms // 2),
        # The server's own pings: a dead client host cancels its calls (its Lease among
        # them) within seconds; without data in between, as many pings as it takes. (This
        # also lets clients ping between requests: keepalive_permit_without_calls.)
        *_keepalive(SERVER_KEEPALIVE_TIME_MS, SERVER_KEEPALIVE_TIMEOUT_MS),
    ]


# Options of a client channel with the defaults (tests and tools that open their own).
CHANNEL_OPTIONS = client_channel_options()

# --- addresses -------------------------------------------------------------------

# gRPC's scheme for Unix domain sockets: "unix:relative/path" or "unix:///absolute/path".
UNIX_SCHEME = "unix:"
# sun_path holds 108 bytes, the terminating NUL included.
MAX_UNIX_PATH_BYTES = 107


def is_unix_address(address: str) -> bool:
    """Whether `address` names a Unix domain socket ("unix:PATH") rather than HOST:PORT."""
    return address.startswith(UNIX_SCHEME)


def unix_socket_path(address: str) -> str:
    """The file system path of a "unix:PATH" or "unix:///PATH" address."""
    path = address.removeprefix(UNIX_SCHEME)
    return path[2:] if path.startswith("//") else path


# --- the ring ----------------------------------------------------------------------

# Metadata of a Forward or Decode call: the addresses of the stages after the one called,
# comma-separated, in order. The stage called relays every step to the first of them.
ROUTE_KEY = "mlx-cluster-route"
# Metadata of a Forward or Decode call that relays: how long a step may take per stage
# after this one (seconds); a stage further down that is later is lost.
STEP_TIMEOUT_KEY = "mlx-cluster-step-timeout"
# The same for a step that verifies drafts: several positions, and the first step of each
# length may compile kernels (MLX's CUDA backend does), so it gets a prompt chunk's time.
DRAFT_STEP_TIMEOUT_KEY = "mlx-cluster-draft-step-timeout"
# Metadata of a call that relays over TLS: the name in the workers' certificates, where it
# is not the host in their addresses (the coordinator's auth.tls_server_name).
TLS_NAME_KEY = "mlx-cluster-tls-name"
# Trailing metadata of a relayed call that failed further down: the failed stage's index,
# counted from the stage called (0). Absent: the stage called failed itself.
STAGE_KEY = "mlx-cluster-stage"
# Metadata of a call that relays: each stage's shared-memory probe, in route order.
SHARED_MEMORY_KEY = "mlx-cluster-shared-memory"
# A Forward call with this invocation metadata gets a failed step's error in band (a
# StepFailure answer): callers that write steps ahead of their answers need it, since a
# write racing the end of a call turns its status into gRPC's own INTERNAL.
FAILURES_IN_BAND_KEY = "mlx-cluster-failures-in-band"
# A relayed step with no deadline from the caller: a stage further down that takes
# longer is lost (a prompt chunk on a slow CPU stays well inside it).
DEFAULT_STEP_TIMEOUT_S = 600.0


_ROUTE_KEYS = (
    ROUTE_KEY,
    STEP_TIMEOUT_KEY,
    TLS_NAME_KEY,
    DRAFT_STEP_TIMEOUT_KEY,
    SHARED_MEMORY_KEY,
)


@dataclass(frozen=True)
class Route:
    """The stages a call relays to, in order, and how their calls are made."""

    addresses: tuple[str, ...]  # the stages after the one called
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S  # per stage after the one called
    tls_name: str | None = None  # the name in their certificates, if not their host
    draft_step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S  # the same, for a step with drafts
    # Each stage's shared-memory probe ("": none), which the stage before it tries to open.
    shared_memory: tuple[str, ...] = ()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata that makes a call relay along this route (none if it is empty)."""
        if not self.addresses:
            return ()
        pairs = [
            (ROUTE_KEY, ",".join(self.addresses)),
            (STEP_TIMEOUT_KEY, f"{self.step_timeout_s:g}"),
            (DRAFT_STEP_TIMEOUT_KEY, f"{self.draft_step_timeout_s:g}"),
        ]
        if self.tls_name:
            pairs.append((TLS_NAME_KEY, self.tls_name))
        if any(self.shared_memory):
            pairs.append((SHARED_MEMORY_KEY, ",".join(self.shared_memory)))
        return tuple(pairs)

    def onward(self) -> Route:
        """The route the next stage relays along."""
        return Route(
            self.addresses[1:],
            self.step_timeout_s,
            self.tls_name,
            self.draft_step_timeout_s,
            self.shared_memory[1:],
        )

    @property
    def next_probe(self) -> str:
        """The next stage's shared-memory probe ("": none)."""
        return self.shared_memory[0] if self.shared_memory else ""

    @classmethod
    def of_call(cls, metadata: object) -> Route:
        """The route a call's invocation metadata names (no addresses: no relay)."""
        found: dict[str, str] = {}
        for key, value in metadata or ():  # type: ignore[attr-defined]
            if key in _ROUTE_KEYS:
                found[key] = str(value)
        addresses = tuple(a for a in found.get(ROUTE_KEY, "").split(",") if a)

        def seconds(key: str) -> float:
            with contextlib.suppress(ValueError):  # a bad value keeps the default
                return max(float(found.get(key, DEFAULT_STEP_TIMEOUT_S)), 0.001)
            return DEFAULT_STEP_TIMEOUT_S

        probes = tuple(found.get(SHARED_MEMORY_KEY, "").split(","))
        return cls(
            addresses,
            seconds(STEP_TIMEOUT_KEY),
            found.get(TLS_NAME_KEY) or None,
            seconds(DRAFT_STEP_TIMEOUT_KEY),
            probes if len(probes) == len(addresses) else (),
        )


def failed_stage(metadata: object) -> int:
    """The index of the stage a relayed call failed on, from its trailing metadata (0: the
    stage called)."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == STAGE_KEY:
            try:
                return max(int(value), 0)
            except ValueError:
                return 0
    return 0


# The name the standard grpc.health.v1 service reports LayerService under.
LAYER_SERVICE_NAME = "mlx_cluster.v1.LayerService"

# Deadlines (seconds) for unary calls; Forward streams carry the request's own deadline.
INFO_DEADLINE_S = 10.0
SESSION_DEADLINE_S = 10.0
LOAD_DEADLINE_S = 600.0
