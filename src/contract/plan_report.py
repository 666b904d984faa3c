"""A cluster plan for people and programs: a table, JSON, a dict for /health."""

from __future__ import annotations

import json as jsonlib
from dataclasses import asdict
from typing import Any

from mlx_cluster.contract.plan import GB, ClusterPlan, WorkerPlan, edge_names


def plan_as_dict(plan: ClusterPlan) -> dict[str, Any]:
    """The plan as plain JSON-ready data."""
    rows = [
        {
            **asdict(w),
            "layers": [w.layers.start, w.layers.end],
            "holds_embedding": w.holds_embedding,
            "holds_head": w.holds_head,
        }
        for w in plan.workers
    ]
    return {"workers": rows, "context_tokens": plan.context_tokens}


def _size(n: int) -> str:
    if n >= GB:
        return f"{n / GB:.2f} GB"
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _edges(worker: WorkerPlan) -> str:
    """What it holds besides its layers, e.g. "+ embedding 94 MB"; "" for none."""
    names = edge_names(worker.holds_embedding, worker.holds_head)
    return f"+ {names} {_size(worker.edge_weight_bytes)}" if names else ""


def render_plan(plan: ClusterPlan, json: bool = False) -> str:
    """The plan as a table (worker, layers, weight GB, edges, KV tokens, memory use), or JSON."""
    if json:
        return jsonlib.dumps(plan_as_dict(plan), indent=2)
    header = ("worker", "layers", "weights GB", "edges", "KV tokens", "memory use")
    rows_text = [
        (
            w.name,
            str(w.layers),
            f"{w.weight_bytes / GB:.2f}",
            _edges(w),
            str(w.kv_tokens),
            f"{w.memory_fraction * 100:.0f}%",
        )
        for w in plan.workers
    ]
    widths = [max(len(row[i]) for row in [header, *rows_text]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip()
        for row in [header, *rows_text]
    ]
    lines.append(f"context: {plan.context_tokens} tokens; the coordinator holds no weights")
    return "\n".join(lines)
