"""Load test: many concurrent streaming chat requests against a real cluster on loopback.

Every request must end one of two ways: completed (a finish_reason, then
`[DONE]`) or refused with 429 and Retry-After. Anything else is counted by kind
(HTTP status, error event code, client timeout = hung, exception), and a
request that yields no outcome at all is lost. Afterwards every worker must
report 0 sessions and 0 KV tokens in use, and each worker's RSS must come back
to within a tolerance of its baseline, taken after a warm-up round.

    python -m benchmarks.load_test [--requests 64] [--workers 2] [--model DIR]
        [--max-tokens 32] [--kv-budget-tokens N] [--json PATH]

Workers run as subprocesses (`mlx_cluster.local.local_workers`); the coordinator,
its HTTP server and the load generator share this process and its event loop.
Without `--kv-budget-tokens` each worker's budget holds about half of the
requests at once, so the run exercises refusals too; 0 keeps the workers' default.
Exit status 1 when a request was lost, hung or failed, or a worker kept state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.memory import PeakRss
from mlx_cluster.coordinator.engine.client import WorkerClient

MB = 1e6
PROMPT = "Request {i}: write a short story about a lighthouse keeper."

# --- one request ---------------------------------------------------------------------


@dataclass
class Outcome:
    """How one streaming request ended."""

    index: int
    kind: str  # completed | refused | http_error | stream_error | incomplete | hung | exception
    status: int | None = None  # HTTP status, when one came
    code: str | None = None  # error code of an error body or event, or the exception's type
    finish_reason: str | None = None
    chunks: int = 0  # content events received
    retry_after: str | None = None  # the Retry-After header of a 429
    seconds: float = 0.0  # from sending to the end of the stream


def chat_body(index: int, max_tokens: int) -> dict[str, Any]:
    """The streaming chat request number `index` sends."""
    return {
        "messages": [{"role": "user", "content": PROMPT.format(i=index)}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": index,
        "stream": True,
    }


def _error_code(text: str) -> str | None:
    with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
        return str(json.loads(text)["error"]["code"])
    return None


async def _read_stream(response: httpx.Response, outcome: Outcome) -> None:
    """Fill `outcome` from a 200 event stream."""
    done = False
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            outcome.kind, outcome.code = "stream_error", str(event["error"].get("code"))
            return
        outcome.chunks += 1
        for choice in event.get("choices", []):
            outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
    outcome.kind = "completed" if done and outcome.finish_reason else "incomplete"


async def stream_chat(
    http: httpx.AsyncClient, index: int, body: dict[str, Any], timeout: float
) -> Outcome:
    """Send one streaming chat request and classify how it ended; never raises."""
    outcome = Outcome(index, "exception")
    started = time.perf_counter()
    try:
        async with (
            asyncio.timeout(timeout),
            http.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            outcome.status = response.status_code
            if response.status_code == 200:
                await _read_stream(response, outcome)
            else:
                outcome.code = _error_code((await response.aread()).decode(errors="replace"))
                outcome.kind = "refused" if response.status_code == 429 else "http_error"
                outcome.retry_after = response.headers.get("retry-after")
    except TimeoutError:
        outcome.kind = "hung"
    except Exception as exc:  # every other failure is an outcome, never a lost request
        outcome.kind, outcome.code = "exception", type(exc).__name__
    outcome.seconds = time.perf_counter() - started
    return outcome


async def fire(
    url: str,
    count: int,
    body_for: Callable[[int], dict[str, Any]],
    timeout: float,
    headers: dict[str, str] | None = None,
) -> list[Outcome]:
    """Send `count` streaming requests at once; one Outcome per request, in order."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(timeout), limits=limits, headers=headers
    ) as http:
        tasks = [
            asyncio.create_task(stream_chat(http, i, body_for(i), timeout)) for i in range(count)
        ]
        done = await asyncio.gather(*tasks, return_exceptions=True)
    return [
        d if isinstance(d, Outcome) else Outcome(i, "lost", code=type(d).__name__)
        for i, d in enumerate(done)
    ]


# --- the tally -----------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes counted: what the closing note of a run reports."""

    requests: int
    completed: int
    refused: int
    errors: dict[str, int]  # "http 503", "event worker_unavailable", "hung", ...
    finish_reasons: dict[str, int]
    refused_without_retry_after: int
    latency_s: dict[str, float]  # p50 / p95 / max of completed requests

    @property
    def all_accounted(self) -> bool:
        """Every request completed or was refused with Retry-After."""
        return (
            self.completed + self.refused == self.requests
            and not self.errors
            and not self.refused_without_retry_after
        )


def _error_kind(outcome: Outcome) -> str:
    if outcome.kind == "http_error":
        return f"http {outcome.status} {outcome.code}"
    if outcome.kind == "stream_error":
        return f"event {outcome.code}"
    if outcome.kind in {"exception", "lost"}:
        return f"{outcome.kind} {outcome.code}"
    return outcome.kind  # hung, incomplete


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else 0.0


def tally(outcomes: Sequence[Outcome], requests: int) -> Tally:
    completed = [o for o in outcomes if o.kind == "completed"]
    refused = [o for o in outcomes if o.kind == "refused"]
    errors = Counter(_error_kind(o) for o in outcomes if o.kind not in {"completed", "refused"})
    if len(outcomes) < requests:
        errors["lost"] += requests - len(outcomes)
    seconds = [o.seconds for o in completed]
    return Tally(
        requests=requests,
        completed=len(completed),
        refused=len(refused),
        errors=dict(errors),
        finish_reasons=dict(Counter(str(o.finish_reason) for o in completed)),
        refused_without_retry_after=sum(not o.retry_after for o in refused),
        latency_s={
            "p50": statistics.median(seconds) if seconds else 0.0,
            "p95": _quantile(seconds, 0.95),
            "max": max(seconds, default=0.0),
        },
    )


# --- the workers afterwards ----------------------------------------------------------


@dataclass
class WorkerState:
    """One worker after the load: what its Info reports, and its memory."""

    address: str
    sessions_open: int
    kv_used_tokens: int
    settle_s: float  # how long until it reported no session (0 if at once)
    rss_baseline_mb: float | None = None
    rss_peak_mb: float | None = None
    rss_after_mb: float | None = None


async def wait_until_idle(
    clients: Sequence[WorkerClient], timeout: float = 10.0
) -> list[WorkerState]:
    """Ask every worker until it reports no session and no KV token, or `timeout` passes.

    Sessions end on the workers as their streams close, which may trail the
    HTTP response by a round trip; this waits on that, it does not sleep blindly.
    """
    started = time.perf_counter()
    states = []
    for client in clients:
        while True:
            info = await client.info()
            elapsed = time.perf_counter() - started
            idle = info.sessions_open == 0 and info.kv_used_tokens == 0
            if idle or elapsed > timeout:
                break
            await asyncio.sleep(0.05)
        states.append(
            WorkerState(client.address, info.sessions_open, info.kv_used_tokens, round(elapsed, 3))
        )
    return states


class ErrorLogCount(logging.Handler):
    """Counts a logger's ERROR records instead of printing them (their tracebacks).

    uvicorn logs every exception that reaches its ASGI boundary with a traceback,
    429s included; the run reports how many there were rather than print them all.
    """

    def __init__(self, logger_name: str) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self._logger = logging.getLogger(logger_name)
        self._saved: list[logging.Handler] = []
        self._propagate = True

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1

    def __enter__(self) -> ErrorLogCount:
        self._saved, self._logger.handlers = self._logger.handlers, [self]
        self._propagate, self._logger.propagate = self._logger.propagate, False
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.handlers = self._saved
        self._logger.propagate = self._propagate


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MB


# --- the run -------------------------------------------------------------------------


@dataclass
class Options:
    """A run's settings (the command-line flags)."""

    requests: int = 64
    workers: int = 2
    model: Path | None = None
    max_tokens: int = 32
    kv_budget_tokens: int | None = None  # None: room for about half of the requests
    request_timeout_s: float = 120.0  # a request still open after this has hung
    warmup_requests: int | None = None  # None: a round as large as the measured one
    rss_tolerance_mb: float = 50.0  # RSS may end this much above its baseline ...
    rss_tolerance_frac: float = 0.10  # ... or this fraction of it, whichever is larger
    json_path: Path | None = None


@dataclass
class Report:
    """One run: its settings, how the requests ended, and the workers afterwards."""

    options: dict[str, Any]
    kv_budget_tokens: int  # each worker's; 0 = the workers' own default
    reserve_per_request: int  # KV tokens each request reserves (prompt + max_tokens)
    wall_s: float = 0.0  # the measured round, from the first request to the last answer
    tally: Tally | None = None
    workers: list[WorkerState] = field(default_factory=list)
    coordinator_rss_mb: dict[str, float] = field(default_factory=dict)
    server_error_logs: int = 0  # ERROR records uvicorn logged during the measured round
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def build_model(out_dir: Path) -> Path:
    """A small random llama (8 layers, hidden 256) with its tokenizer."""
    from mlx_cluster.models.random_model import build_random_model

    return build_random_model(out_dir, "llama", num_layers=8, hidden_size=256)


def reserve_tokens(model: Path, max_tokens: int, count: int) -> int:
    """The largest KV reservation (prompt + max_tokens) of the first `count` requests."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model)
    prompts = (chat_body(i, max_tokens)["messages"] for i in range(count))
    return max_tokens + max(
        len(tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in prompts
    )


def check(report: Report, opts: Options) -> None:
    """Fill `report.problems` from the tally and the workers' state."""
    t = report.tally
    assert t is not None, "check a report after measure() filled it"
    if not t.all_accounted:
        report.problems.append(
            f"{t.requests - t.completed - t.refused} of {t.requests} requests neither "
            f"completed nor were refused: {t.errors}"
        )
    if t.refused_without_retry_after:
        report.problems.append(f"{t.refused_without_retry_after} refusals had no Retry-After")
    for w in report.workers:
        if w.sessions_open or w.kv_used_tokens:
            report.problems.append(
                f"worker {w.address} still holds {w.sessions_open} sessions and "
                f"{w.kv_used_tokens} KV tokens"
            )
        if w.rss_baseline_mb is not None and w.rss_after_mb is not None:
            allowed = max(opts.rss_tolerance_mb, opts.rss_tolerance_frac * w.rss_baseline_mb)
            if w.rss_after_mb > w.rss_baseline_mb + allowed:
                report.problems.append(
                    f"worker {w.address} RSS {w.rss_after_mb:.0f} MB after the load, "
                    f"baseline {w.rss_baseline_mb:.0f} MB (+{allowed:.0f} MB allowed)"
                )


@dataclass
class Served:
    """What a run talks to: the API's URL, and each worker's client and process id."""

    url: str
    clients: list[WorkerClient]
    pids: list[int]


@contextlib.asynccontextmanager
async def serve(model: Path, opts: Options, budget: int) -> AsyncIterator[Served]:
    """Worker processes, the coordinator over them and its HTTP API; all stopped on exit."""
    from mlx_cluster.contract.config import LimitsConfig
    from mlx_cluster.coordinator.api.app import create_app
    from mlx_cluster.coordinator.api.server import HttpServer
    from mlx_cluster.coordinator.engine.cluster import Cluster
    from mlx_cluster.local import local_workers

    limits = LimitsConfig(
        max_tokens_ceiling=opts.max_tokens,
        default_max_tokens=opts.max_tokens,
        request_timeout_s=opts.request_timeout_s,
    )
    async with local_workers(opts.workers, ["--log-level", "WARNING"]) as procs:
        kv = {"budget_tokens": budget, "max_session_tokens": budget, "prefix_cache_gb": 0}
        coordinator = await Cluster.start(model, [p.address for p in procs], kv=kv)
        server = HttpServer(create_app(coordinator, limits), "127.0.0.1", 0)
        await server.start()
        clients = [WorkerClient(p.address) for p in procs]
        try:
            yield Served(server.url, clients, [p.process.pid for p in procs])
        finally:
            await asyncio.gather(*(c.close() for c in clients))
            await server.stop()
            await coordinator.close()


async def measure(cluster: Served, opts: Options, report: Report) -> None:
    """Warm up, take the RSS baselines, run the measured round, then check the workers."""
    body = lambda i: chat_body(i, opts.max_tokens)  # noqa: E731
    # A warm-up as large as the measured round grows MLX's buffer cache to its
    # working size, so that RSS above the baseline afterwards is a leak.
    warmup = opts.requests if opts.warmup_requests is None else opts.warmup_requests
    with ErrorLogCount("uvicorn.error"):
        await fire(cluster.url, warmup, body, opts.request_timeout_s)
    await wait_until_idle(cluster.clients)
    baseline = [rss_mb(pid) for pid in cluster.pids]
    own_before = rss_mb(os.getpid())

    started = time.perf_counter()
    with PeakRss(cluster.pids) as peaks, ErrorLogCount("uvicorn.error") as error_logs:
        outcomes = await fire(cluster.url, opts.requests, body, opts.request_timeout_s)
    report.wall_s = round(time.perf_counter() - started, 2)

    report.tally = tally(outcomes, opts.requests)
    report.server_error_logs = error_logs.count
    report.workers = await wait_until_idle(cluster.clients)
    for state, pid, base in zip(report.workers, cluster.pids, baseline, strict=True):
        state.rss_baseline_mb = round(base, 1)
        state.rss_peak_mb = round(peaks.peaks[pid] / MB, 1)
        state.rss_after_mb = round(rss_mb(pid), 1)
    report.coordinator_rss_mb = {
        "before": round(own_before, 1),
        "after": round(rss_mb(os.getpid()), 1),
    }


async def run(opts: Options) -> Report:
    """Start a cluster, load it, and check how every request and every worker ended."""
    with tempfile.TemporaryDirectory(prefix="mlx-cluster-load-") as tmp:
        model = opts.model or build_model(Path(tmp) / "model")
        reserve = reserve_tokens(model, opts.max_tokens, opts.requests)
        budget = (
            max(1, opts.requests // 2) * reserve
            if opts.kv_budget_tokens is None
            else opts.kv_budget_tokens
        )
        options = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}
        report = Report(options, budget, reserve)
        async with serve(model, opts, budget) as cluster:
            await measure(cluster, opts, report)
    check(report, opts)
    return report


# --- output ----------------------------------------------------------------------------


def render(report: Report) -> str:
    """The report as a table, ending with PASS or FAIL and why."""
    t = report.tally
    assert t is not None
    rows = [
        ("requests", t.requests),
        ("completed", f"{t.completed}  {t.finish_reasons}"),
        ("refused (429)", t.refused),
        *((f"error: {kind}", n) for kind, n in sorted(t.errors.items())),
        ("errors", sum(t.errors.values())),
        ("server ERROR log records", report.server_error_logs),
        ("wall time", f"{report.wall_s:.2f} s"),
        ("latency p50/p95/max", "/".join(f"{v:.2f}" for v in t.latency_s.values()) + " s"),
        ("KV budget per worker", f"{report.kv_budget_tokens} tokens"),
        ("reserve per request", f"{report.reserve_per_request} tokens"),
    ]
    lines = [f"{name:<24} {value}" for name, value in rows]
    lines.append("")
    lines.append(
        f"{'worker':<18} {'sessions':>8} {'kv used':>8} {'settle s':>8} "
        f"{'RSS base MB':>11} {'peak MB':>8} {'after MB':>8}"
    )
    for w in report.workers:
        lines.append(
            f"{w.address:<18} {w.sessions_open:>8} {w.kv_used_tokens:>8} {w.settle_s:>8} "
            f"{w.rss_baseline_mb:>11} {w.rss_peak_mb:>8} {w.rss_after_mb:>8}"
        )
    c = report.coordinator_rss_mb
    lines.append(f"coordinator RSS MB: {c.get('before')} before, {c.get('after')} after")
    lines.append("")
    lines.append("PASS" if report.passed else "FAIL: " + "; ".join(report.problems))
    return "\n".join(lines)


def as_json(report: Report) -> dict[str, Any]:
    return {**asdict(report), "passed": report.passed}


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.load_test",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--requests", type=int, default=64, help="concurrent streaming requests")
    p.add_argument("--workers", type=int, default=2, help="worker processes on loopback")
    p.add_argument("--model", type=Path, default=None, help="default: a random 8-layer llama")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    p.add_argument(
        "--kv-budget-tokens",
        type=int,
        default=None,
        help="each worker's KV budget; default room for half the requests; 0 = workers' own",
    )
    p.add_argument("--request-timeout", dest="request_timeout_s", type=float, default=120.0)
    p.add_argument(
        "--warmup-requests",
        type=int,
        default=None,
        help="concurrent requests before the RSS baseline; default as many as --requests",
    )
    p.add_argument("--rss-tolerance-mb", type=float, default=50.0)
    p.add_argument("--json", dest="json_path", type=Path, default=None, help="also write here")
    return Options(**vars(p.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    import mlx.core as mx

    opts = parse_args(argv)
    try:
        report = asyncio.run(run(opts))
    finally:
        mx.clear_streams()  # MLX's streams must go before the interpreter does
    print(render(report))
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(as_json(report), indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
