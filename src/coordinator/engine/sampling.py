"""Sampling parameters of a request, turned into mlx-lm's samplers and logits processors."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_cluster.contract.errors import InvalidArgument

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
Sampler = Callable[[mx.array], mx.array]


class InvalidParam(InvalidArgument):
    """An InvalidArgument that names the request parameter at fault (OpenAI's `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def check_token_ids(param: str, ids: Iterable[int], vocab_size: int) -> None:
    """Refuse token ids outside [0, vocab_size).

    MLX does not bounds-check gathers: an id past the vocabulary reads garbage
    from the embedding or the logits, or crashes deep in the pipeline.

    Raises:
        InvalidParam: naming `param`, the bad ids and the vocabulary size.
    """
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if not bad:
        return
    if len(bad) == 1:
        which = f"token id {bad[0]} is"
    else:
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        which = f"{len(bad)} token ids ({shown}) are"
    raise InvalidParam(
        param,
        f"{param}: {which} out of range for a vocabulary of {vocab_size} "
        f"(ids 0 to {vocab_size - 1})",
    )


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_tokens: int = 256  # new tokens at most
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling; 1 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    repetition_context_size: int = 20  # tokens the penalty looks back over
    presence_penalty: float = 0.0  # OpenAI's; 0 = off
    frequency_penalty: float = 0.0  # OpenAI's; 0 = off
    seed: int | None = None  # makes sampling reproducible per request
    stop: tuple[str, ...] = ()  # stop strings, not included in the output
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    top_logprobs: int = 0  # alternatives to report per token
    ignore_eos: bool = False  # keep going past end-of-sequence tokens

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "at least 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("top_k", self.top_k >= 0, "0 or more"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "in (0, 10]"),
            ("repetition_context_size", self.repetition_context_size >= 1, "at least 1"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("top_logprobs", 0 <= self.top_logprobs <= 20, "in [0, 20]"),
            ("stop", all(self.stop) and len(self.stop) <= 16, "up to 16 non-empty strings"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise InvalidParam(name, f"{name} must be {rule}, got {getattr(self, name)!r}")

    def check(self, vocab_size: int) -> None:
        """Check the fields that depend on the model: top_k and the logit_bias token ids.

        Raises:
            InvalidParam: top_k is not below `vocab_size`, or a logit_bias key is
                outside [0, vocab_size).
        """
        if self.top_k >= vocab_size:
            raise InvalidParam(
                "top_k",
                f"top_k must be less than the vocabulary size {vocab_size}, got {self.top_k}",
            )
        check_token_ids("logit_bias", self.logit_bias, vocab_size)

    def sampler(self) -> Sampler:
        """mlx-lm's sampler for these parameters (argmax when temperature is 0)."""
        top_p = self.top_p if self.top_p < 1.0 else 0.0
        return make_sampler(self.temperature, top_p=top_p, min_p=self.min_p, top_k=self.top_k)

    def logits_processors(self) -> list[LogitsProcessor]:
        """mlx-lm's logits processors for these parameters."""
        return make_logits_processors(
            logit_bias=self.logit_bias or None,
            repetition_penalty=self.repetition_penalty if self.repetition_penalty != 1.0 else None,
            repetition_context_size=self.repetition_context_size,
            presence_penalty=self.presence_penalty or None,
            frequency_penalty=self.frequency_penalty or None,
        )

    def reseed(self, step: int) -> None:
        """Seed MLX's generator for one step of a seeded request.

        MLX has one global generator; requests interleave on it. Seeding from
        (seed, step) before each draw makes a seeded request's tokens depend on
        nothing but its own seed, whatever runs beside it.
        """
        if self.seed is not None:
            mx.random.seed((self.seed * 1_000_003 + step) % 2**63)


class TokenPicker:
    """One request's sampling state: its sampler, logits processors and token history.

    `pick` is one step of mlx-lm's generate_step after the model call: the
    processors see every token fed so far, logprobs = logits - logsumexp, then
    the sampler draws (reseeded per step for a seeded request).
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.sampler = params.sampler()
        self.processors = params.logits_processors()
        self.history: mx.array | None = None  # tokens fed so far, kept only for processors
        self.steps = 0

    def feed(self, tokens: mx.array) -> None:
        """Record prompt tokens sent without sampling (prefill chunks)."""
        if self.processors:
            self.history = (
                tokens if self.history is None else mx.concatenate([self.history, tokens])
            )

    def pick(self, inputs: mx.array, logits: mx.array) -> tuple[mx.array, mx.array]:
        """The next token [1] and the logprobs [1, vocab] after feeding `inputs` [L]."""
        if self.processors:
            self.feed(inputs)
            history = cast(mx.array, self.history)
            for processor in self.processors:
                logits = processor(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        self.params.reseed(self.steps)
        self.steps += 1
        return self.sampler(logprobs), logprobs
