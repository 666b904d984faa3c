"""Which worker holds which layers, and how many tokens of KV cache each can keep.

Pure functions over numbers: no MLX, no I/O. The coordinator runs `plan_layers`
at start-up; `mlx-cluster plan` prints its result without loading weights.

Memory model of one worker holding layers [a, b):
    weights(a, b) + edges + kv(a, b, tokens) + reserve <= usable memory
where edges are the ends of the model it holds: the first worker holds the token
embedding (and a draft model, if any), the last the final norm and LM head (a tied
model's head is the embedding matrix: the first and the last worker each hold it, a
single one once).
kv charges each layer `kv_bytes_per_token_per_layer[i]` per token, up to its
sliding window if it has one. Sizes are in bytes; GB in messages is 1e9 bytes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlx_cluster.contract.layers import (
    LayerRange,
    at_least_one,
    check_coverage,
    split_by_counts,
    split_proportional,
)

if TYPE_CHECKING:
    from mlx_cluster.contract.config import ClusterConfig

GB = 1_000_000_000


class PlanError(ValueError):
    """No assignment of layers to workers fits; the message has every worker's numbers."""


@dataclass(frozen=True)
class ModelFacts:
    """What the planner needs to know about a model, read without loading weights."""

    num_layers: int
    layer_weight_bytes: list[int]  # bytes of each decoder layer's parameters
    embedding_bytes: int  # the token embedding: held by the first worker
    head_bytes: int  # final norm + LM head (tied: + the embedding matrix): the last worker's
    kv_bytes_per_token_per_layer: list[int]  # K and V bytes one token adds to each layer
    max_context: int  # longest sequence the model supports (max_position_embeddings)
    kv_window: list[int | None] | None = None  # per layer: sliding window, None = global
    shared_edge_bytes: int = 0  # in both of the above (a tied matrix): held once by one worker
    draft_bytes: int = 0  # a draft model the first worker holds too (speculative decoding)

    def __post_init__(self) -> None:
        n = self.num_layers
        lengths = [len(self.layer_weight_bytes), len(self.kv_bytes_per_token_per_layer)]
        if self.kv_window is not None:
            lengths.append(len(self.kv_window))
        if n <= 0 or any(length != n for length in lengths):
            raise ValueError(f"model facts for {n} layers have per-layer lists of {lengths}")
        if not 0 <= self.shared_edge_bytes <= min(self.embedding_bytes, self.head_bytes):
            raise ValueError(
                f"shared_edge_bytes {self.shared_edge_bytes} must be >= 0 and part of both "
                f"embedding_bytes {self.embedding_bytes} and head_bytes {self.head_bytes}"
            )

    def edge_bytes(self, first: bool, last: bool) -> int:
        """Bytes of the edges a worker holds besides its layers, if first and/or last."""
        first_bytes = self.embedding_bytes + self.draft_bytes
        held = (first_bytes if first else 0) + (self.head_bytes if last else 0)
        return held - self.shared_edge_bytes if first and last else held

    def edge_loads(self, workers: int) -> list[int]:
        """`edge_bytes` of each of `workers` workers in chain order."""
        return [self.edge_bytes(k == 0, k == workers - 1) for k in range(workers)]


@dataclass(frozen=True)
class WorkerCapacity:
    """One worker as the planner sees it."""

    name: str
    memory_bytes: int  # memory this worker may use for weights, KV and reserve
    compute: float  # relative speed; layers are split in proportion to it

    def __post_init__(self) -> None:
        if self.memory_bytes < 0 or not self.compute > 0:
            raise ValueError(
                f"worker {self.name}: memory_bytes must be >= 0 and compute > 0, "
                f"got {self.memory_bytes} and {self.compute}"
            )


@dataclass(frozen=True)
class WorkerPlan:
    """One worker's share of the model."""

    name: str
    layers: LayerRange
    weight_bytes: int  # parameters of its layers
    edge_weight_bytes: int  # parameters of the edges it holds too (see holds_*)
    kv_tokens: int  # tokens of KV cache its budget holds over all sessions
    memory_bytes_used: int  # weights + edges + KV budget + reserve
    memory_fraction: float  # memory_bytes_used / usable memory

    @property
    def holds_embedding(self) -> bool:
        """First in the chain: it holds the token embedding."""
        return self.layers.start == 0

    @property
    def holds_head(self) -> bool:
        """Last in the chain: it holds the final norm and LM head."""
        return self.layers.end == self.layers.total


@dataclass(frozen=True)
class ClusterPlan:
    """The whole assignment; workers in chain order. The coordinator holds no weights."""

    workers: list[WorkerPlan]
    context_tokens: int  # longest sequence the cluster admits


def edge_names(first: bool, last: bool) -> str:
    """The edges a worker first and/or last holds: "embedding", "head", both or ""."""
    return " and ".join(name for name, held in (("embedding", first), ("head", last)) if held)


# --- arithmetic ------------------------------------------------------------------------


class _Costs:
    """Prefix sums that give the weight and KV bytes of any layer range in O(1)."""

    def __init__(self, facts: ModelFacts, context_tokens: int) -> None:
        weights, kv = [0], [0]
        for i in range(facts.num_layers):
            window = None if facts.kv_window is None else facts.kv_window[i]
            tokens = context_tokens if window is None else min(window, context_tokens)
            weights.append(weights[-1] + facts.layer_weight_bytes[i])
            kv.append(kv[-1] + facts.kv_bytes_per_token_per_layer[i] * tokens)
        self._weights, self._kv = weights, kv

    def weights(self, start: int, end: int) -> int:
        return self._weights[end] - self._weights[start]

    def kv(self, start: int, end: int) -> int:
        """KV bytes of one sequence of the planned context over layers [start, end)."""
        return self._kv[end] - self._kv[start]

    def need(self, start: int, end: int) -> int:
        """Weights plus KV of one planned-context sequence over layers [start, end)."""
        return self.weights(start, end) + self.kv(start, end)


# --- assignment ------------------------------------------------------------------------


def _fitting_boundaries(
    costs: _Costs, limits: list[int], targets: list[int], num_layers: int
) -> list[int] | None:
    """Boundaries b_0=0 < b_1 < ... < b_m=n where worker k's layers [b_k, b_k+1) fit limits[k].

    Among those that fit, returns the one closest to `targets` (sum of |b_k - t_k|),
    found by dynamic programming over (worker, boundary); None if nothing fits.
    """
    m, inf = len(limits), math.inf
    best: list[float] = [0.0] + [inf] * num_layers  # best[j]: cost with layers [0, j) placed
    choices: list[list[int]] = []
    for k in range(m):
        new, choice = [inf] * (num_layers + 1), [-1] * (num_layers + 1)
        for end in range(k + 1, num_layers - (m - k - 1) + 1):
            for start in range(end - 1, k - 1, -1):
                if costs.need(start, end) > limits[k]:
                    break  # longer ranges only need more
                cost = best[start] + abs(end - targets[k])
                if cost < new[end]:
                    new[end], choice[end] = cost, start
        best = new
        choices.append(choice)
    if best[num_layers] == inf:
        return None
    bounds = [num_layers]
    for k in range(m - 1, -1, -1):
        bounds.append(choices[k][bounds[-1]])
    return bounds[::-1]


def _no_fit_error(
    facts: ModelFacts,
    workers: list[WorkerCapacity],
    counts: list[int],
    costs: _Costs,
    context_tokens: int,
    reserve_bytes: int,
) -> PlanError:
    total = facts.num_layers
    edges = facts.edge_loads(len(workers))
    lines = [
        f"model needs {costs.weights(0, total) / GB:.1f} GB of layer weights + "
        f"{sum(edges) / GB:.1f} GB of edges (embedding, head) + "
        f"{costs.kv(0, total) / GB:.1f} GB KV for {context_tokens} tokens "
        f"(+ {reserve_bytes / GB:.1f} GB reserve per worker); the {len(workers)} workers "
        f"have {sum(w.memory_bytes for w in workers) / GB:.1f} GB usable in all, and no "
        f"split of the {total} layers fits:"
    ]
    ranges = split_by_counts(counts, total)
    for w, r, edge in zip(workers, ranges, edges, strict=True):
        need = costs.need(r.start, r.end) + edge + reserve_bytes
        held = f" + {edge_names(r.start == 0, r.end == total)} {edge / GB:.1f} GB" if edge else ""
        lines.append(
            f"  {w.name}: layers {r}{held} need {need / GB:.1f} GB, "
            f"{w.memory_bytes / GB:.1f} GB usable"
        )
    return PlanError("\n".join(lines))


def plan_layers(
    facts: ModelFacts,
    workers: list[WorkerCapacity],
    *,
    context_tokens: int,
    reserve_bytes: int,
    manual: list[LayerRange] | None = None,
    kv_fraction: float = 1.0,
    kv_budget_bytes: int | None = None,
) -> ClusterPlan:
    """Assign each worker a contiguous layer range, in chain order, and size its KV cache.

    Layers go in proportion to `compute` (largest remainder, at least one each); if
    that does not fit, the fitting split closest to it is taken. A worker fits when its
    weights (the first worker's with the embedding, the last's with the head), the KV
    of one `context_tokens`-long sequence and `reserve_bytes` fit its memory.

    Args:
        facts: The model's per-layer sizes.
        workers: Capacities in chain order.
        context_tokens: Sequence length every worker must hold (capped at the model's).
        reserve_bytes: Memory left free on every worker.
        manual: Ranges given by the user, one per worker; checked, not changed.
        kv_fraction: Share of the memory left after weights and reserve given to KV.
        kv_budget_bytes: KV bytes per worker instead of the fraction (capped by memory).

    Raises:
        PlanError: nothing fits (each worker's need and capacity in GB), fewer layers
            than workers, or manual ranges that do not cover the model once.
    """
    if not workers:
        raise PlanError("no workers to plan for")
    context = min(context_tokens, facts.max_context)
    if context <= 0:
        raise PlanError(f"context must be at least 1 token, got {context_tokens}")
    costs = _Costs(facts, context)
    if manual is not None:
        ranges = _check_manual(manual, workers, facts.num_layers)
        limits = _layer_limits(facts, workers, reserve_bytes)
        if any(costs.need(r.start, r.end) > lim for r, lim in zip(ranges, limits, strict=True)):
            counts = [r.count for r in ranges]
            raise _no_fit_error(facts, workers, counts, costs, context, reserve_bytes)
    else:
        ranges = _assign(facts, workers, costs, context, reserve_bytes)
    plans = [
        _size_worker(w, r, edge, costs, facts, context, reserve_bytes, kv_fraction, kv_budget_bytes)
        for w, r, edge in zip(workers, ranges, facts.edge_loads(len(workers)), strict=True)
    ]
    cluster_context = min([context, *(p.kv_tokens for p in plans)])
    return ClusterPlan(plans, cluster_context)


def _layer_limits(
    facts: ModelFacts, workers: list[WorkerCapacity], reserve_bytes: int
) -> list[int]:
    """Bytes each worker has for its layers and their KV: memory less reserve and edges."""
    edges = facts.edge_loads(len(workers))
    return [w.memory_bytes - reserve_bytes - e for w, e in zip(workers, edges, strict=True)]


def _assign(
    facts: ModelFacts,
    workers: list[WorkerCapacity],
    costs: _Costs,
    context: int,
    reserve_bytes: int,
) -> list[LayerRange]:
    """The split proportional to compute if it fits, else the fitting split closest to it."""
    total = facts.num_layers
    if total < len(workers):
        raise PlanError(f"model has {total} layers, fewer than the {len(workers)} workers")
    counts = at_least_one(split_proportional(total, [w.compute for w in workers]))
    targets = [sum(counts[: k + 1]) for k in range(len(counts))]
    limits = _layer_limits(facts, workers, reserve_bytes)
    bounds = _fitting_boundaries(costs, limits, targets, total)
    if bounds is None:
        raise _no_fit_error(facts, workers, counts, costs, context, reserve_bytes)
    return [LayerRange(a, b, total) for a, b in itertools.pairwise(bounds)]


def _check_manual(
    manual: list[LayerRange], workers: list[WorkerCapacity], num_layers: int
) -> list[LayerRange]:
    if len(manual) != len(workers):
        raise PlanError(f"{len(manual)} manual layer ranges for {len(workers)} workers")
    try:
        check_coverage(manual)
    except ValueError as exc:
        raise PlanError(f"manual layer ranges: {exc}") from exc
    if manual[0].total != num_layers:
        raise PlanError(
            f"manual layer ranges are for {manual[0].total} layers, the model has {num_layers}"
        )
    return manual


def manual_ranges(pairs: list[tuple[int, int]], num_layers: int) -> list[LayerRange]:
    """Half-open [start, end) pairs from a config as LayerRanges of this model.

    Raises:
        PlanError: if a range is empty or goes past the model's layers.
    """
    ranges = []
    for start, end in pairs:
        if not 0 <= start < end <= num_layers:
            raise PlanError(
                f"manual layer range [{start}, {end}) is not inside the model's {num_layers} layers"
            )
        ranges.append(LayerRange(start, end, num_layers))
    return ranges


def plan_for_config(
    facts: ModelFacts, config: ClusterConfig, workers: list[WorkerCapacity]
) -> ClusterPlan:
    """`plan_layers` with a cluster config's context, KV, reserve and manual layers.

    The planned context is kv.max_session_tokens, capped by kv.max_sequence_length
    (or the model's context when that is unset). `kv.budget_tokens`, when set, is
    every worker's KV budget instead of one sized from memory; it must hold one
    session of the planned context.
    """
    kv = config.kv
    context = min(kv.max_session_tokens, kv.max_sequence_length or facts.max_context)
    pairs = [w.layers for w in config.workers if w.layers is not None]
    planned = plan_layers(
        facts,
        workers,
        context_tokens=context,
        reserve_bytes=int(config.reserve_gb * GB),
        manual=manual_ranges(pairs, facts.num_layers) if pairs else None,
        kv_fraction=kv.memory_fraction,
        kv_budget_bytes=None if kv.memory_gb is None else int(kv.memory_gb * GB),
    )
    if kv.budget_tokens is None:
        return planned
    if kv.budget_tokens < planned.context_tokens:
        raise PlanError(
            f"kv.budget_tokens ({kv.budget_tokens}) cannot hold one session of "
            f"{planned.context_tokens} tokens (kv.max_session_tokens, capped by the model's "
            "context): lower kv.max_session_tokens or raise the budget"
        )
    # An explicit budget replaces the one sized from memory (memory is not re-checked).
    budgeted = [dataclasses.replace(w, kv_tokens=kv.budget_tokens) for w in planned.workers]
    return dataclasses.replace(planned, workers=budgeted)


def _size_worker(
    worker: WorkerCapacity,
    layers: LayerRange,
    edge_bytes: int,
    costs: _Costs,
    facts: ModelFacts,
    context: int,
    reserve_bytes: int,
    kv_fraction: float,
    kv_budget_bytes: int | None,
) -> WorkerPlan:
    """KV budget: the policy's share of what is left, never less than one full context.

    Sliding-window layers are charged their window averaged over the context, so
    `kv_tokens` is exact for sessions of `context` tokens.
    """
    weights = costs.weights(layers.start, layers.end)
    free = worker.memory_bytes - weights - edge_bytes - reserve_bytes
    policy = kv_budget_bytes if kv_budget_bytes is not None else int(free * kv_fraction)
    full_context = costs.kv(layers.start, layers.end)
    budget = min(free, max(full_context, policy))
    # Layers without KV (linear attention, SSM: fixed-size state) are limited by the model only.
    kv_tokens = budget * context // full_context if full_context > 0 else facts.max_context
    used = weights + edge_bytes + budget + reserve_bytes
    return WorkerPlan(
        name=worker.name,
        layers=layers,
        weight_bytes=weights,
        edge_weight_bytes=edge_bytes,
        kv_tokens=kv_tokens,
        memory_bytes_used=used,
        memory_fraction=used / max(worker.memory_bytes, 1),
    )
