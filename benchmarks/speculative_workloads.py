"""What `python -m benchmarks.speculative` runs (its prompts), what each engine reports,
and the summary and table made of it.

**copy** asks to repeat about 310 tokens of Python code (SmolLM2's tokenizer)
with a variable renamed, so prompt lookup's drafts should be accepted; **no
copy** asks for a short story. Each is sent as a one-message chat, through the
model's chat template. Every run of an engine on a prompt is a `Sample`; an
engine's samples on one prompt make a `Measurement`, and one pipeline's drafting
(none, prompt lookup or a draft model, at one draft count) is one engine.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_lm.tokenizer_utils import TokenizerWrapper

from benchmarks.cluster import DecodeBreakdown
from benchmarks.pipeline import matching_prefix
from benchmarks.report import text_table

COPY_INSTRUCTION = "Repeat this code exactly, but rename the variable `total` to `sum_of_values`:\n"
COPY_CODE = '''\
def summarize_orders(orders, tax_rate=0.08):
    """Return the number of paid orders and their total, tax included."""
    total = 0.0
    count = 0
    for order in orders:
        if order.get("status") != "paid":
            continue
        subtotal = sum(item["price"] * item["quantity"] for item in order["items"])
        discount = order.get("discount", 0.0)
        total += (subtotal - discount) * (1 + tax_rate)
        count += 1
    return count, round(total, 2)


def average_order_value(orders, tax_rate=0.08):
    count, total = summarize_orders(orders, tax_rate)
    if count == 0:
        return 0.0
    return round(total / count, 2)


def monthly_totals(orders):
    """Group paid orders by month ("YYYY-MM") and add up each month's total."""
    totals = {}
    for order in orders:
        if order.get("status") != "paid":
            continue
        month = order["date"][:7]
        total = totals.get(month, 0.0)
        for item in order["items"]:
            total += item["price"] * item["quantity"]
        totals[month] = total
    return dict(sorted(totals.items()))
'''
METHOD_LABELS = {"none": "", "prompt_lookup": "lookup", "draft": "draft"}  # in table order
WORKLOADS = {
    "copy": COPY_INSTRUCTION + COPY_CODE,
    "no copy": "Write a short story about a lighthouse keeper.",
}


def chat_prompts(tokenizer: TokenizerWrapper) -> dict[str, list[int]]:
    """Each workload's text as a one-message chat, in token ids."""
    return {
        name: list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True
            )
        )
        for name, text in WORKLOADS.items()
    }


@dataclass
class Sample:
    """One measured generation."""

    tokens: list[int]
    ttft_s: float  # from asking to the first token
    decode_tokens_per_s: float  # (tokens - 1) / (last token's arrival - first's); nan below 2
    drafted: int = 0  # draft tokens verified (DraftStats; the pipeline only)
    accepted: int = 0  # of those, kept
    traversals: int = 0  # decode steps through the pipeline that carried the request
    decode: DecodeBreakdown | None = None  # mean decode step (traversal) on the ring, 2..N
    recoveries: int = 0  # sessions replayed after a worker failed: timings are then invalid


@dataclass
class Measurement:
    """One engine on one workload: its samples, and the median one."""

    workload: str
    engine: str  # "mlx-lm" or "pipeline"
    num_draft_tokens: int  # the most drafts a step; 0 = no speculation
    method: str = "none"  # how the drafts come: "prompt_lookup" or "draft" (a draft model)
    samples: list[Sample] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.engine == "mlx-lm":
            return "mlx-lm"
        k = self.num_draft_tokens
        return "pipeline" + (f" {METHOD_LABELS[self.method]} k={k}" if k else "")

    @property
    def median(self) -> Sample:
        """The sample of median decode rate (the lower middle one for an even count)."""
        rate = statistics.median_low(s.decode_tokens_per_s for s in self.samples)
        return next(s for s in self.samples if s.decode_tokens_per_s == rate)


@dataclass
class Run:
    """Everything one benchmark run measured."""

    model_dir: Path
    draft_model_dir: Path | None
    prompt_tokens: dict[str, int]
    stop_tokens: list[int]
    measurements: list[Measurement]
    other_load_cores: dict[str, float]


# --- reporting ----------------------------------------------------------------------


def by_workload(run: Run) -> dict[str, list[Measurement]]:
    """Each workload's measurements: mlx-lm's, the plain pipeline's, then prompt lookup's
    and the draft model's, each by draft count."""
    order = list(METHOD_LABELS)
    return {
        name: sorted(
            (m for m in run.measurements if m.workload == name),
            key=lambda m: (m.engine == "pipeline", order.index(m.method), m.num_draft_tokens),
        )
        for name in run.prompt_tokens
    }


def token_check(m: Measurement, reference: Measurement) -> dict[str, Any]:
    """Whether every sample of `m` gave the tokens of `reference`'s first sample."""
    want = reference.samples[0].tokens
    firsts = [matching_prefix(s.tokens, want) for s in m.samples]
    equal = all(s.tokens == want for s in m.samples)
    return {"tokens_equal": equal, "first_difference": None if equal else min(firsts)}


def compare(m: Measurement, base: Measurement, plain: Measurement) -> dict[str, Any]:
    """The median sample of `m` against mlx-lm (`base`) and the plain pipeline, its tokens
    checked against the plain pipeline's if it drafts, else against mlx-lm's."""
    s = m.median
    rate = s.decode_tokens_per_s
    return {
        "method": m.method,
        "num_draft_tokens": m.num_draft_tokens,
        "tokens_per_s": rate,
        "over_pipeline": rate / plain.median.decode_tokens_per_s,
        "over_mlx_lm": rate / base.median.decode_tokens_per_s,
        "completion_tokens": len(s.tokens),
        "drafted": s.drafted,
        "accepted": s.accepted,
        "acceptance_rate": s.accepted / s.drafted if s.drafted else None,
        "traversals": s.traversals,
        "tokens_per_traversal": len(s.tokens) / s.traversals if s.traversals else None,
        **token_check(m, plain if m.num_draft_tokens else base),
    }


def summary(run: Run) -> list[dict[str, Any]]:
    """Per workload: rates, ratios, what the drafts earned and the token checks."""
    rows = []
    for workload, (base, plain, *speculative) in by_workload(run).items():
        pipeline = compare(plain, base, plain)
        rows.append(
            {
                "workload": workload,
                "mlx_lm_tokens_per_s": base.median.decode_tokens_per_s,
                "pipeline_tokens_per_s": pipeline["tokens_per_s"],
                "pipeline_over_mlx_lm": pipeline["over_mlx_lm"],
                "pipeline_vs_mlx_lm": token_check(plain, base),
                "speculative": [compare(m, base, plain) for m in speculative],
            }
        )
    return rows


def table(run: Run) -> str:
    """One row per engine and workload: its median run against the others."""
    rows: list[dict[str, str]] = []
    for workload, (base, plain, *speculative) in by_workload(run).items():
        for m in (base, plain, *speculative):
            c, s, pipeline = compare(m, base, plain), m.median, m is not base
            per_traversal, accepted, d = c["tokens_per_traversal"], c["acceptance_rate"], s.decode
            same = "yes" if c["tokens_equal"] else f"NO (from {c['first_difference']})"
            rows.append(
                {
                    "workload": workload,
                    "engine": m.label,
                    "decode tok/s": f"{c['tokens_per_s']:.2f}",
                    "runs tok/s": "/".join(f"{x.decode_tokens_per_s:.1f}" for x in m.samples),
                    "vs pipeline": f"{c['over_pipeline']:.2f}x" if m.num_draft_tokens else "-",
                    "vs mlx-lm": f"{c['over_mlx_lm']:.2f}x" if pipeline else "-",
                    "tokens": str(c["completion_tokens"]),
                    "traversals": str(s.traversals) if pipeline else "-",
                    "tok/traversal": "-" if per_traversal is None else f"{per_traversal:.2f}",
                    "drafted": str(s.drafted) if pipeline else "-",
                    "accepted": str(s.accepted) if pipeline else "-",
                    "accept %": "-" if accepted is None else f"{100 * accepted:.0f}",
                    "step ms": f"{d.wall_s * 1e3:.1f}" if d else "-",
                    "compute ms": f"{d.compute_s * 1e3:.1f}" if d else "-",
                    "same tokens": same if pipeline else "-",
                }
            )
    return text_table(list(rows[0]), [list(row.values()) for row in rows])


def mismatches(rows: list[dict[str, Any]]) -> list[str]:
    """The speculative runs whose tokens differ from the plain pipeline's."""
    return [
        f"{row['workload']}: {spec['method']} k={spec['num_draft_tokens']} differs "
        f"from the pipeline without drafts from token {spec['first_difference']} on"
        for row in rows
        for spec in row["speculative"]
        if not spec["tokens_equal"]
    ]


# The copy prompt's code is 310 tokens with 10 uses of the variable to rename: an edit
# every 31 tokens. A successor workload edits its run as often by default.
EDIT_EVERY = 32


def successor_prompts(vocab_size: int, edit_every: int = EDIT_EVERY) -> dict[str, list[int]]:
    """Token-id prompts for a successor model (`models.ensure_successor_model`), which
    follows t with t + 1; every id below `vocab_size`.

    **copy**: a run of up to 900 consecutive ids, every `edit_every`-th replaced by
    another id, then the run's first ids again: the model goes on counting past them,
    and prompt lookup drafts from the run, right up to its next edit (a rejected draft).
    **no copy**: ids with no run, so lookup finds no continuation that the model follows.
    """
    length, start = min(900, vocab_size // 4), min(1000, vocab_size // 8)
    run = [
        start + i if i % edit_every != edit_every - 1 else start + length + i for i in range(length)
    ]
    spread = [start + 2 * length + (7919 * i) % length for i in range(length)]
    return {"copy": [*run, *range(start, start + 10)], "no copy": spread}
