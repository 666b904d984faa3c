"""What every engine runs (prompts, token counts) and what it reports, shared by both sides.

The single-process baseline and the pipeline run the same workload: a short
warm-up, one greedy generation of `decode_tokens` tokens after the shortest
prompt (decode rate), then one first token for each prompt length (prefill
rate = prompt tokens / time to first token). Prompts are random token ids
drawn from a seed, so a subprocess rebuilds the same ones from the same
arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WARMUP_PROMPT_TOKENS = 32
WARMUP_NEW_TOKENS = 8


@dataclass(frozen=True)
class Workload:
    """The prompts and token counts of one benchmark run."""

    vocab_size: int  # prompt ids are drawn from [0, vocab_size)
    decode_tokens: int  # new tokens of the decode run
    prompt_lengths: tuple[int, ...]  # prefill runs, one per length
    prefill_step_size: int = 2048  # mlx-lm's prompt chunk (its default)
    seed: int = 0
    cluster_prefill_step_size: int | None = None  # the cluster's; None: the same

    @property
    def cluster_chunk(self) -> int:
        """The cluster's prompt chunk."""
        return self.cluster_prefill_step_size or self.prefill_step_size

    def prompt(self, length: int) -> list[int]:
        """A prompt of `length` random token ids; the same ones for the same length and seed."""
        rng = np.random.default_rng([self.seed, length])
        return [int(t) for t in rng.integers(0, self.vocab_size, size=length)]

    @property
    def decode_prompt(self) -> list[int]:
        return self.prompt(min(self.prompt_lengths))

    @property
    def warmup_prompt(self) -> list[int]:
        return self.prompt(WARMUP_PROMPT_TOKENS)

    def prefill_chunks(self, prompt_tokens: int) -> int:
        """Chunks the prompt's first L - 1 tokens are sent in (the last token is a step)."""
        return math.ceil((prompt_tokens - 1) / self.prefill_step_size)


@dataclass
class PrefillTiming:
    """Time to first token for one prompt length."""

    prompt_tokens: int
    ttft_s: float  # from asking (session open included) to the first token
    tokens_per_s: float = field(init=False)  # prompt_tokens / ttft_s

    def __post_init__(self) -> None:
        self.tokens_per_s = self.prompt_tokens / self.ttft_s


@dataclass
class EngineResult:
    """What one engine (the baseline, or the pipeline over N workers) measured."""

    label: str
    decode_tokens_per_s: float  # (N - 1) tokens / (time of token N - time of token 1)
    decode_ttft_s: float  # time to first token of the decode run's (shortest) prompt
    prefill: list[PrefillTiming]
    tokens: list[int]  # the decode run's tokens
    memory: dict[str, Any] = field(default_factory=dict)
    other_load_cores: float = 0.0  # CPU other processes used meanwhile (see benchmarks.host)


def decode_rate(stamps: list[float]) -> float:
    """Tokens per second between the first and the last token's arrival times."""
    if len(stamps) < 2:
        raise ValueError(f"a decode rate needs at least 2 tokens, got {len(stamps)}")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])
