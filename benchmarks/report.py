"""The tables `python -m benchmarks.pipeline` prints.

Ratios are pipeline / baseline (higher is better for rates), and a hop's
overhead / bare echo round trip of a message of the same size (1.0 = the
hop costs no more than the transport itself): for decode, one round trip of
the ring between two workers; for prefill, one worker's hop from the
coordinator.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.cluster import ClusterResult, HopBreakdown
from benchmarks.echo import EchoResult
from benchmarks.workload import EngineResult

MB = 1e6


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in lines
    )


def _ratio(value: float, base: float | None) -> str:
    return f" ({value / base:.2f}x)" if base else ""


def _memory(result: EngineResult) -> tuple[str, str]:
    """(this process's peak, the workers' peaks) in MB."""
    m = result.memory
    if "worker_peak_rss_bytes" not in m:
        return f"{m['peak_rss_bytes'] / MB:.0f}", "-"
    workers = "/".join(f"{b / MB:.0f}" for b in m["worker_peak_rss_bytes"])
    return f"{m['coordinator_peak_rss_bytes'] / MB:.0f}", workers


def engine_table(baseline: EngineResult | None, results: Sequence[EngineResult]) -> str:
    """Decode and prefill rates, TTFT and peak memory of each engine, with ratios."""
    engines = [r for r in [baseline, *results] if r is not None]
    lengths = [p.prompt_tokens for p in engines[0].prefill]
    headers = [
        "engine",
        "decode tok/s",
        f"TTFT@{lengths[0]} ms",
        *(f"prefill@{n} tok/s" for n in lengths),
        "peak RSS MB",
        "workers RSS MB",
        "other load",
    ]
    rows = []
    for r in engines:
        base = baseline if baseline is not None and r is not baseline else None
        prefill = [
            f"{p.tokens_per_s:.1f}" + _ratio(p.tokens_per_s, base and base.prefill[i].tokens_per_s)
            for i, p in enumerate(r.prefill)
        ]
        rows.append(
            [
                r.label,
                f"{r.decode_tokens_per_s:.2f}"
                + _ratio(r.decode_tokens_per_s, base and base.decode_tokens_per_s),
                f"{r.prefill[0].ttft_s * 1e3:.1f}",
                *prefill,
                *_memory(r),
                f"{r.other_load_cores:.2f}",
            ]
        )
    return text_table(headers, rows)


def _echo_for(echo: Sequence[EchoResult], size: int) -> EchoResult | None:
    return next((e for e in echo if e.message_bytes == size), None)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def step_table(
    baseline: EngineResult | None,
    results: Sequence[ClusterResult],
    echo: Sequence[EchoResult],
    decode_bytes: int,
) -> str:
    """Where one decode step's time goes on the ring: compute, hops, the rest.

    Args:
        decode_bytes: size of the request a decode hop relays, for the echo lookup.
    """
    floor = _echo_for(echo, decode_bytes)
    headers = [
        "engine",
        "step ms",
        "workers compute ms",
        "ring hops ms",
        "per hop ms",
        "echo RTT us",
        "per hop/echo",
        "other ms",
    ]
    rows = []
    if baseline is not None:
        step = 1e3 / baseline.decode_tokens_per_s
        rows.append(["baseline", f"{step:.2f}", *["-"] * (len(headers) - 2)])
    for r in results:
        d = r.decode
        assert d is not None, f"{r.label} has no decode breakdown"
        per_hop = d.per_hop_s
        ratio = f"{per_hop / floor.mean_s:.2f}" if floor and per_hop is not None else "-"
        rows.append(
            [
                r.label,
                _ms(d.wall_s),
                _ms(d.compute_s),
                _ms(d.hops_s),
                _ms(per_hop),
                f"{floor.mean_s * 1e6:.0f}" if floor else "-",
                ratio,
                _ms(d.other_s),
            ]
        )
    return text_table(headers, rows)


def _hop_row(label: str, hop: HopBreakdown, echo: EchoResult | None) -> list[str]:
    us = [f"{t * 1e6:.0f}" for t in (hop.compute_s, hop.encode_s, hop.network_s, hop.decode_s)]
    floor = echo.mean_s if echo else None
    ratios = (
        [f"{floor * 1e6:.0f}", f"{hop.overhead_s / floor:.2f}", f"{hop.network_s / floor:.2f}"]
        if floor
        else ["-", "-", "-"]
    )
    return [label, hop.worker, *us, f"{hop.overhead_s * 1e6:.0f}", *ratios]


HOP_HEADERS = [
    "run",
    "worker",
    "compute us",
    "encode us",
    "network us",
    "decode us",
    "overhead us",
    "echo RTT us",
    "overhead/echo",
    "network/echo",
]


def prefill_hop_table(
    results: Sequence[ClusterResult], echo: Sequence[EchoResult], sizes: dict[str, int]
) -> str:
    """Per-hop means per prefill chunk, per worker, next to the echo floor.

    Args:
        sizes: message bytes by run label ("prefill@1024", ...), for the echo lookup.
    """
    rows = []
    for r in results:
        for length, hops in r.prefill_hops.items():
            size = sizes[f"prefill@{length}"]
            for hop in hops:
                rows.append(_hop_row(f"{r.label} prefill@{length}", hop, _echo_for(echo, size)))
    return text_table(HOP_HEADERS, rows)


def echo_table(echo: Sequence[EchoResult]) -> str:
    headers = ["message bytes", "iterations", "mean us", "median us", "min us"]
    rows = [
        [
            str(e.message_bytes),
            str(e.iterations),
            *(f"{t * 1e6:.0f}" for t in (e.mean_s, e.median_s, e.min_s)),
        ]
        for e in echo
    ]
    return text_table(headers, rows)
