"""Prometheus metrics of the coordinator, in a registry of their own (one per app).

Request counts and latencies are recorded by the HTTP layer, token, draft and
decode-step counts from each generation's last chunk (`finished`); hop timings by
the engine's events (`observe`, subscribed to the cluster); worker gauges are
refreshed from each worker's Info (the cluster's health) when /metrics is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mlx_cluster.coordinator.engine.events import Event, HopEvent
from mlx_cluster.coordinator.engine.generation import Performance
from mlx_cluster.coordinator.engine.health import StageHealth

# Seconds: from sub-millisecond hops to minute-long prefills.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip


class Metrics:
    """Every series /metrics exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mlx_cluster_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "mlx_cluster_requests_in_flight", "requests being served", registry=r
        )
        self.ttft = Histogram(
            "mlx_cluster_time_to_first_token_seconds", "request start to first token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token = Histogram(
            "mlx_cluster_inter_token_latency_seconds", "time between streamed tokens",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.generated = Counter("mlx_cluster_generated_tokens", "tokens generated", registry=r)
        self.prompt = Counter("mlx_cluster_prompt_tokens", "prompt tokens processed", registry=r)
        self.drafted = Counter("mlx_cluster_draft_tokens", "draft tokens verified", registry=r)
        self.accepted = Counter(
            "mlx_cluster_draft_tokens_accepted", "draft tokens verified and kept", registry=r
        )
        self.decode_steps = Counter(
            "mlx_cluster_decode_steps", "pipeline traversals that carried a request", registry=r
        )
        self.hop = Histogram(
            "mlx_cluster_hop_seconds",
            "one step on one worker, by phase (serialize, network: the hop into it, compute, "
            "deserialize)",
            ["worker", "phase"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.kv_used = Gauge(
            "mlx_cluster_worker_kv_tokens_used", "KV tokens in use", ["worker"], registry=r
        )
        self.kv_capacity = Gauge(
            "mlx_cluster_worker_kv_tokens_capacity", "KV token capacity", ["worker"], registry=r
        )
        self.sessions = Gauge(
            "mlx_cluster_worker_sessions_open", "open sessions", ["worker"], registry=r
        )
        self.cached = Counter(
            "mlx_cluster_prompt_tokens_cached",
            "prompt tokens a kept prefix gave (prefix cache)",
            registry=r,
        )
        self.prefix_lookups = Counter(
            "mlx_cluster_prefix_cache_lookups", "prompts looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter(
            "mlx_cluster_prefix_cache_hits", "prompts that started from a kept prefix", registry=r
        )
        self.prefix_bytes = Gauge(
            "mlx_cluster_worker_prefix_cache_bytes",
            "bytes of kept prefixes",
            ["worker"],
            registry=r,
        )
        self.worker_up = Gauge(
            "mlx_cluster_worker_up", "1 if the worker answered", ["worker"], registry=r
        )

    def finished(self, perf: Performance) -> None:
        """Record a generation that ended, from its last chunk's performance."""
        self.ttft.observe(perf.ttft_s)
        self.generated.inc(perf.completion_tokens)
        self.prompt.inc(perf.prompt_tokens)
        self.drafted.inc(perf.draft_tokens)
        self.accepted.inc(perf.accepted_draft_tokens)
        self.decode_steps.inc(perf.decode_steps)
        self.cached.inc(perf.cached_prompt_tokens)
        self.prefix_lookups.inc(perf.prefix_lookup)
        self.prefix_hits.inc(perf.cached_prompt_tokens > 0)

    def observe(self, event: Event) -> None:
        """Record one step on one worker (seconds); network = round trip minus compute."""
        if not isinstance(event, HopEvent):
            return
        for phase, seconds in (
            ("serialize", event.encode_s),
            ("network", event.network_s),
            ("compute", event.compute_s),
            ("deserialize", event.decode_s),
        ):
            self.hop.labels(event.worker, phase).observe(seconds)

    def set_worker(self, stage: StageHealth) -> None:
        """Refresh a stage's worker gauges from the Info it just gave (None: no answer)."""
        worker, info = stage.name, stage.info
        self.worker_up.labels(worker).set(0 if info is None else 1)
        if info is not None:
            self.kv_used.labels(worker).set(info.kv_used_tokens)
            self.kv_capacity.labels(worker).set(info.kv_capacity_tokens)
            self.sessions.labels(worker).set(info.sessions_open)
            self.prefix_bytes.labels(worker).set(info.prefix_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
