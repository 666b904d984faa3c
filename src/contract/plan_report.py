"""A cluster plan for people and programs: a table, JSON, a dict for /health."""

from __future__ import annotations

import json as jsonlib
from dataclasses import asdict
from typing import Any

from mlx_cluster.contract.plan import GB, ClusterPlan


def plan_as_dict(plan: ClusterPlan) -> dict[str, Any]:
    """The plan as plain JSON-ready data."""
    rows = [{**asdict(w), "layers": [w.layers.start, w.layers.end]} for w in plan.workers]
    return {
        "workers": rows,
        "context_tokens": plan.context_tokens,
        "edge_weight_bytes": plan.edge_weight_bytes,
    }


def render_plan(plan: ClusterPlan, json: bool = False) -> str:
    """The plan as a table (worker, layers, weight GB, KV tokens, memory use %), or JSON."""
    if json:
        return jsonlib.dumps(plan_as_dict(plan), indent=2)
    header = ("worker", "layers", "weights GB", "KV tokens", "memory use")
    rows_text = [
        (
            w.name,
            str(w.layers),
            f"{w.weight_bytes / GB:.2f}",
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
    lines.append(
        f"context: {plan.context_tokens} tokens; coordinator holds "
        f"{plan.edge_weight_bytes / GB:.2f} GB (embedding, norm, head)"
    )
    return "\n".join(lines)
