"""What `python -m benchmarks.speculative` runs (its prompts) and what each engine reports.

**copy** asks to repeat about 310 tokens of Python code (SmolLM2's tokenizer)
with a variable renamed, so prompt lookup's drafts should be accepted; **no
copy** asks for a short story. Each is sent as a one-message chat, through the
model's chat template. Every run of an engine on a prompt is a `Sample`; an
engine's samples on one prompt make a `Measurement`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from mlx_lm.tokenizer_utils import TokenizerWrapper

from benchmarks.cluster import DecodeBreakdown

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
    num_draft_tokens: int  # prompt lookup's most drafts a step; 0 = no speculation
    samples: list[Sample] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.engine == "mlx-lm":
            return "mlx-lm"
        k = self.num_draft_tokens
        return "pipeline" + (f" lookup k={k}" if k else "")

    @property
    def median(self) -> Sample:
        """The sample of median decode rate (the lower middle one for an even count)."""
        rate = statistics.median_low(s.decode_tokens_per_s for s in self.samples)
        return next(s for s in self.samples if s.decode_tokens_per_s == rate)
