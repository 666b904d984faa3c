"""The cluster configuration's schema: every setting, its default and its check.

Every default of the cluster lives here, once (the worker's own settings live in
`mlx_cluster.worker.settings`). The loader that merges the file, .env, the
environment and CLI flags into it is `contract.config_loader`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mlx_cluster.contract.rpc import (
    KEEPALIVE_TIME_MS,
    KEEPALIVE_TIMEOUT_MS,
    MAX_MESSAGE_BYTES,
    MIB,
)
from mlx_cluster.contract.speculation import MAX_DRAFT_TOKENS, Speculation, SpeculativeMethod

ENV_PREFIX = "MLX_CLUSTER_"
# Variables with our prefix that belong to the tools, not to the cluster's settings.
TOOL_ENV = frozenset(
    f"{ENV_PREFIX}{name}"
    for name in ("HOME", "RUN_DIR", "PYTHON", "URL", "WORKER_LISTEN", "WORKER_NAME", "PROGRESS")
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Settings whose values are never printed (`config show`, validation errors).
SECRET_FIELDS = frozenset({"auth.token", "auth.api_keys"})


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem, one per line."""


# --- schema ----------------------------------------------------------------------------


def check_address(value: str, *, allow_port_zero: bool = False, allow_unix: bool = False) -> str:
    """Return `value` if it is HOST:PORT (IPv6 hosts in brackets), else raise ValueError.

    With `allow_unix`, a Unix domain socket address unix:PATH is accepted too.
    """
    if allow_unix and value.startswith("unix:"):
        if len(value) == len("unix:"):
            raise ValueError(f"expected unix:PATH with a socket path, got {value!r}")
        return value
    low = 0 if allow_port_zero else 1
    host, _, port = value.rpartition(":")
    if host.strip("[]") == "" or not port.isdigit() or not low <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with port {low}-65535, got {value!r}")
    return value


def _split_commas(value: Any) -> Any:
    """Lists from the environment or the CLI come as "a,b,c"."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class CoordinatorConfig(_Strict):
    """Where the coordinator serves HTTP."""

    http_listen: str = "127.0.0.1:8100"  # HOST:PORT of the OpenAI-style HTTP API (port 0: any)
    cors_origins: list[str] = []  # origins browsers may call the API from
    shutdown_grace_s: float = Field(default=30.0, ge=0)  # on SIGTERM, in-flight requests get this

    @field_validator("http_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return check_address(value, allow_port_zero=True)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        return _split_commas(value)


class WorkerEntry(_Strict):
    """One worker, in chain order."""

    address: str  # HOST:PORT of its gRPC server (or unix:PATH on the coordinator's host)
    name: str | None = None  # shown in plans and logs; default: the address
    layers: tuple[int, int] | None = None  # manual half-open range [start, end)
    memory_gb: float | None = Field(default=None, gt=0)  # memory to use, instead of detected
    compute: float | None = Field(default=None, gt=0)  # relative compute weight override

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_address(value, allow_unix=True)

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 0 <= value[0] < value[1]:
            raise ValueError(f"expected [start, end) with 0 <= start < end, got {list(value)}")
        return value

    @property
    def label(self) -> str:
        return self.name or self.address


class KVConfig(_Strict):
    """How much KV cache the workers keep."""

    max_session_tokens: int = Field(default=8192, gt=0)  # longest session (prompt + output)
    max_sequence_length: int | None = Field(default=None, gt=0)  # None = the model's context
    memory_gb: float | None = Field(default=None, gt=0)  # KV memory per worker, over fraction
    memory_fraction: float = Field(default=0.5, gt=0, le=1)  # of free memory after weights
    session_ttl_s: float | None = Field(default=None, gt=0)  # idle TTL; None: each worker's own
    budget_tokens: int | None = Field(default=None, gt=0)  # each worker's KV; None: from memory
    # Each worker keeps ended sessions' caches as prefixes for later requests (prefix
    # cache), in at most this much memory, inside its KV budget and yielding to live
    # sessions; 0 turns it off.
    prefix_cache_gb: float = Field(default=2.0, ge=0)


class LimitsConfig(_Strict):
    """What one request may ask for."""

    max_prompt_bytes: int = Field(default=1_048_576, gt=0)  # UTF-8 bytes of the prompt
    max_prompt_tokens: int | None = Field(default=None, gt=0)  # None = the cluster's context
    default_max_tokens: int = Field(default=256, gt=0)  # when a request gives no max_tokens
    max_tokens_ceiling: int = Field(default=4096, gt=0)  # the most a request may ask for
    request_timeout_s: float = Field(default=300.0, gt=0)  # a request ends by then, sends included
    send_timeout_s: float = Field(default=10.0, gt=0)  # a stream left unread this long ends
    max_messages: int = Field(default=1024, gt=0)  # chat messages in one request
    max_choices: int = Field(default=8, ge=1, le=64)  # n: choices of one prompt
    # HTTP request body, counted while it arrives; None = 2x max_prompt_bytes + 1 MiB
    # (JSON escapes double non-ASCII text; the rest of the request fits in the MiB).
    max_body_bytes: int | None = Field(default=None, gt=0)
    queue_length: int = Field(default=16, ge=0)  # requests that may wait for KV room; then 429
    queue_timeout_s: float = Field(default=30.0, ge=0)  # longest wait for KV room; then 429
    # Largest gRPC message to workers (match the workers' --max-message-mb).
    max_message_mb: int = Field(default=MAX_MESSAGE_BYTES // MIB, ge=1, le=2047)

    @model_validator(mode="after")
    def _defaults_below_ceiling(self) -> LimitsConfig:
        if self.default_max_tokens > self.max_tokens_ceiling:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must not exceed "
                f"max_tokens_ceiling ({self.max_tokens_ceiling})"
            )
        return self

    @property
    def body_limit(self) -> int:
        """The largest HTTP request body accepted, in bytes."""
        return self.max_body_bytes or 2 * self.max_prompt_bytes + MIB


class BatchingConfig(_Strict):
    """Continuous batching: requests decode together in micro-batches that keep stages busy."""

    enabled: bool = True  # off: every request steps alone
    max_batch: int = Field(default=32, ge=1, le=256)  # requests decoding at once; more wait
    micro_batches: int = Field(default=0, ge=0, le=64)  # decode lanes; 0 = one per worker
    prefill_chunk: int = Field(default=512, ge=1)  # prompt tokens per prefill step


class SpeculativeConfig(_Strict):
    """Speculative decoding: a decode step also verifies tokens drafted for a request, so
    one traversal of the pipeline can give several of its tokens (the tokens are those of
    decoding without drafts). The server's default; a request may ask for its own."""

    method: SpeculativeMethod = "none"  # prompt_lookup: drafts from the request's own tokens
    num_draft_tokens: int = Field(default=4, ge=1, le=MAX_DRAFT_TOKENS)  # drafts a step, at most

    draft_model: str | None = None  # for `draft`: a small model with the same vocabulary

    @model_validator(mode="after")
    def _draft_model_for_draft(self) -> SpeculativeConfig:
        if self.method == "draft" and not self.draft_model:
            raise ValueError("method draft needs draft_model: a small model's directory")
        return self

    def speculation(self) -> Speculation:
        """The engine's default for requests that do not say."""
        return Speculation(self.method, self.num_draft_tokens, self.draft_model)


class LivenessConfig(_Strict):
    """How soon a worker that stopped answering counts as lost (then a standby takes its
    stage, or its requests end with 503). A frozen worker or a silent link is noticed within
    ping_interval_s + ping_timeout_s; a stalled decode step within decode_hop_timeout_s."""

    ping_interval_s: float = Field(default=KEEPALIVE_TIME_MS / 1000, ge=1)  # keepalive pings
    ping_timeout_s: float = Field(default=KEEPALIVE_TIMEOUT_MS / 1000, gt=0)  # then link dropped
    decode_hop_timeout_s: float = Field(default=10.0, gt=0)  # a decode step, per ring stage
    prefill_hop_timeout_s: float = Field(default=120.0, gt=0)  # one prompt chunk on one worker
    probe_timeout_s: float = Field(default=1.0, gt=0)  # Info asked of a failed worker or standby
    restart_wait_s: float = Field(default=5.0, ge=0)  # wait for a refusing worker to come back
    end_wait_s: float = Field(default=0.5, ge=0)  # a finished request waits for EndSession


class DiscoveryConfig(_Strict):
    """Workers found on the local network (DNS-SD over multicast DNS) instead of listed:
    `workers: auto` in the file, or `mlx-cluster coordinator --discover`. Those found are
    asked for Info with the cluster token; those that refuse it are not used."""

    enabled: bool = False  # find workers instead of taking `workers` from the file
    expected_workers: int | None = Field(default=None, ge=1)  # start once this many answer
    timeout_s: float = Field(default=10.0, gt=0)  # wait at most this long, then use those found


class WeightsConfig(_Strict):
    """Weights that travel: the coordinator sends each worker the files of its slice (only
    its layers' tensors, plus the embedding or head of the first or last stage) into the
    worker's model cache, so only the coordinator's host needs the model."""

    send: bool | None = None  # None: when workers are discovered; False: workers have the model
    chunk_kb: int = Field(default=4096, ge=1, le=65536)  # bytes per chunk, each checksummed


class LoggingConfig(_Strict):
    """Where and how processes log."""

    level: str = "INFO"  # one of DEBUG, INFO, WARNING, ERROR, CRITICAL
    format: Literal["text", "json"] = "text"  # json: one object per line
    file: str | None = None  # also log to this file

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return value.upper()


class AuthConfig(_Strict):
    """Credentials: the token and TLS towards workers, API keys on the HTTP API."""

    token: str | None = Field(default=None, min_length=1)  # the workers' shared cluster token
    token_file: str | None = None  # or a file holding it (instead of token)
    tls_cert: str | None = None  # client certificate (PEM) for workers that require mutual TLS
    tls_key: str | None = None  # the private key of tls_cert
    tls_ca: str | None = None  # CA (PEM) that signed the workers' certificates; turns TLS on
    tls_server_name: str | None = None  # name in the workers' certificates, if not their host
    api_keys: list[str] = []  # keys HTTP clients must send as `Authorization: Bearer KEY`
    api_keys_file: str | None = None  # or a file of keys, one a line (added to api_keys)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        return _split_commas(value)

    @model_validator(mode="after")
    def _pairs(self) -> AuthConfig:
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        return self


class ClusterConfig(_Strict):
    """Everything a cluster needs, from one file (plus overrides)."""

    model: str = Field(min_length=1)  # local model directory or Hugging Face model id
    coordinator: CoordinatorConfig = Field(default_factory=CoordinatorConfig)  # the HTTP side
    # In chain order: first runs layer 0. `auto`: found on the network (the discovery section).
    workers: list[WorkerEntry] = []
    standby: list[WorkerEntry] = []  # spare workers that take over a failed worker's layers
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)  # workers: auto
    weights: WeightsConfig = Field(default_factory=WeightsConfig)  # weights sent to workers
    kv: KVConfig = Field(default_factory=KVConfig)  # KV cache sizing
    limits: LimitsConfig = Field(default_factory=LimitsConfig)  # per-request limits
    batching: BatchingConfig = Field(default_factory=BatchingConfig)  # continuous batching
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)  # drafted tokens
    liveness: LivenessConfig = Field(default_factory=LivenessConfig)  # when a worker is lost
    logging: LoggingConfig = Field(default_factory=LoggingConfig)  # level, format, file
    auth: AuthConfig = Field(default_factory=AuthConfig)  # cluster token, TLS, HTTP API keys
    reserve_gb: float = Field(default=1.0, ge=0)  # memory left free on every worker

    @model_validator(mode="before")
    @classmethod
    def _workers_auto(cls, data: Any) -> Any:
        """`workers: auto` turns discovery on."""
        if isinstance(data, dict) and data.get("workers") in ("auto", ["auto"]):
            discovery = data.get("discovery") or {}
            if isinstance(discovery, dict):
                data = {**data, "workers": [], "discovery": {**discovery, "enabled": True}}
        return data

    @property
    def sends_weights(self) -> bool:
        """Whether the coordinator sends workers their slices' files."""
        return self.discovery.enabled if self.weights.send is None else self.weights.send

    @field_validator("workers", "standby", mode="before")
    @classmethod
    def _worker_shorthand(cls, value: Any) -> Any:
        value = _split_commas(value)
        if isinstance(value, list):
            return [{"address": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("workers")
    @classmethod
    def _workers(cls, workers: list[WorkerEntry]) -> list[WorkerEntry]:
        for attr in ("address", "name"):
            values = [getattr(w, attr) for w in workers if getattr(w, attr) is not None]
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"each worker needs its own {attr}, {dupes} appear twice")
        _check_manual_layers(workers)
        return workers

    @model_validator(mode="after")
    def _workers_given(self) -> ClusterConfig:
        if not self.workers and not self.discovery.enabled:
            raise ValueError(
                "workers: list at least one worker, or give `workers: auto` (or "
                "`coordinator --discover`) to find them on the network"
            )
        return self

    @model_validator(mode="after")
    def _chunks_fit_messages(self) -> ClusterConfig:
        chunk, limit = self.weights.chunk_kb * 1024, self.limits.max_message_mb * MIB
        if chunk + MIB > limit:  # a MiB for the chunk's other fields, and to spare
            raise ValueError(
                f"weights.chunk_kb ({self.weights.chunk_kb} KiB) plus 1 MiB must fit in "
                f"limits.max_message_mb ({self.limits.max_message_mb} MiB)"
            )
        return self

    @model_validator(mode="after")
    def _standby_apart(self) -> ClusterConfig:
        active = {w.address for w in self.workers}
        shared = sorted(active & {w.address for w in self.standby})
        if shared:
            raise ValueError(f"standby workers must not also be active workers: {shared}")
        return self


def _check_manual_layers(workers: list[WorkerEntry]) -> None:
    given = [i for i, w in enumerate(workers) if w.layers is not None]
    if not given:
        return
    if len(given) != len(workers):
        missing = [i for i, w in enumerate(workers) if w.layers is None]
        raise ValueError(
            f"either every worker gives layers or none does; workers {given} do, {missing} do not"
        )
    expected = 0
    for i, w in enumerate(workers):
        start, end = w.layers or (0, 0)
        if start < expected:
            raise ValueError(
                f"workers[{i}].layers [{start}, {end}) overlaps the layers before it, "
                f"which end at {expected}"
            )
        if start > expected:
            raise ValueError(
                f"workers[{i}].layers [{start}, {end}) leaves a gap: layers "
                f"[{expected}, {start}) belong to no worker"
            )
        expected = end
