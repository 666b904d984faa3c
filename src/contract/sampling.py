"""How a session picks its tokens: parameters, mlx-lm's samplers and processors, results.

The coordinator checks a request's SamplingParams and sends them (`to_spec`)
when it opens a session; the stage holding the LM head rebuilds them
(`from_spec`), keeps one TokenPicker per session and answers each sampling
step with SampledTokens (worker/picking.py draws them). Sampling is a step of
mlx-lm's generate_step: the same processors, logprobs and sampler give its tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, cast

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_cluster import tensor
from mlx_cluster.contract.errors import InvalidParam
from mlx_cluster.contract.grammar import Constraint
from mlx_cluster.contract.proto import layer_service_pb2 as pb

if TYPE_CHECKING:
    from mlx_cluster.contract.speculation import Speculation

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
Sampler = Callable[[mx.array], mx.array]


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


def _from_float32(value: float) -> float:
    # The spec carries float32: 0.7 arrives as 0.699999988. Its shortest float32 repr
    # gives back the number that was sent, so a spec round trip keeps the params equal.
    return float(str(np.float32(value)))


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
    full_logprobs: bool = False  # report the whole logprob vector with each token (evaluation)
    speculative: Speculation | None = None  # how it drafts tokens; None = the server's default
    constraint: Constraint | None = None  # a grammar its text must follow; None = free text

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
            (
                "ignore_eos",
                not (self.ignore_eos and self.constraint),
                "off with a constraint, whose text ends with end-of-sequence",
            ),
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

    # --- on the wire ---------------------------------------------------------------

    def to_spec(self) -> pb.SamplingSpec:
        """The fields the sampling stage needs, every one written (a set spec is complete).

        max_tokens, stop, ignore_eos and speculative stay with the coordinator.
        """
        spec = pb.SamplingSpec(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            repetition_context_size=self.repetition_context_size,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias,
            top_logprobs=self.top_logprobs,
            full_logprobs=self.full_logprobs,
        )
        if self.seed is not None:
            # Any int seeds alike modulo 2**64 (see reseed), which fits the wire's uint64.
            spec.seed = self.seed % 2**64
        if self.constraint is not None:
            self.constraint.to_proto(spec.grammar)
        return spec

    @classmethod
    def from_spec(cls, spec: pb.SamplingSpec) -> SamplingParams:
        """The params a spec carries; the coordinator's own fields keep their defaults.

        An empty spec (an OpenSessionRequest whose `sampling` is unset) means greedy
        defaults: proto3 reads its unset floats as 0, which would be top_p = 0.

        Raises:
            InvalidParam: a field out of range, as the constructor checks it, or an
                unknown grammar kind.
        """
        if spec.ByteSize() == 0:
            return cls()
        return cls(
            temperature=_from_float32(spec.temperature),
            top_p=_from_float32(spec.top_p),
            top_k=spec.top_k,
            min_p=_from_float32(spec.min_p),
            repetition_penalty=_from_float32(spec.repetition_penalty),
            repetition_context_size=spec.repetition_context_size,
            presence_penalty=_from_float32(spec.presence_penalty),
            frequency_penalty=_from_float32(spec.frequency_penalty),
            seed=spec.seed if spec.HasField("seed") else None,
            logit_bias={int(k): _from_float32(v) for k, v in spec.logit_bias.items()},
            top_logprobs=spec.top_logprobs,
            full_logprobs=spec.full_logprobs,
            constraint=Constraint.from_proto(spec.grammar) if spec.HasField("grammar") else None,
        )

    def for_prompt(self, length: int) -> SamplingParams:
        """These params for a prompt of `length` tokens: a constraint applies after it."""
        if self.constraint is None:
            return self
        return replace(self, constraint=self.constraint.starting_at(length))

    @property
    def sees_every_token(self) -> bool:
        """Whether the sampling stage must see every token of a session (a kept prefix's
        too): its logits processors do, and so does a constraint's matcher."""
        return self.constraint is not None or bool(self.logits_processors())

    # --- mlx-lm's parts ------------------------------------------------------------

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

    def reseed(self, position: int) -> None:
        """Seed MLX's generator for the draw of the token at `position`, if seeded.

        MLX has one global generator; requests interleave on it. Seeding from
        (seed, position) before each draw makes a seeded request's tokens depend
        on nothing but its own seed and tokens: not on what runs beside it, nor on
        which worker draws (a session replayed on a new worker draws the same).
        """
        if self.seed is not None:
            mx.random.seed((self.seed * 1_000_003 + position) % 2**63)


# --- picking ---------------------------------------------------------------------


class TokenPicker:
    """One session's sampling state: its sampler, logits processors and token history.

    `pick` is one step of mlx-lm's generate_step after the model call: the
    processors see every token fed so far, logprobs = logits - logsumexp, then
    the sampler draws (reseeded by position for a seeded session).
    """

    def __init__(self, params: SamplingParams, constraint: LogitsProcessor | None = None) -> None:
        """`constraint`: the processor that enforces `params.constraint` (the stage that
        samples builds it from the model's tokenizer); it runs after the others."""
        self.params = params
        self.sampler = params.sampler()
        self.processors = params.logits_processors() + ([constraint] if constraint else [])
        self.history: mx.array | None = None  # tokens fed so far, kept only for processors

    def feed(self, tokens: mx.array) -> None:
        """Record tokens [L] sent without sampling (prefill chunks)."""
        if self.processors:
            self.history = (
                tokens if self.history is None else mx.concatenate([self.history, tokens])
            )

    def truncate(self, length: int) -> None:
        """Forget the tokens fed after the first `length` (the session's cache was cut)."""
        if self.history is not None:
            self.history = self.history[:length]

    def process(self, inputs: mx.array, logits: mx.array) -> mx.array:
        """Feed `inputs` [L] (the step's tokens) and apply the processors to `logits`
        [1, vocab], the last position's: what mlx-lm's generate_step does before it draws."""
        if not self.processors:
            return logits
        self.feed(inputs)
        history = cast(mx.array, self.history)
        for processor in self.processors:
            logits = processor(history, logits)
        return logits

    def draw(self, logprobs: mx.array, position: int) -> mx.array:
        """The token [1] drawn from `logprobs` [1, vocab] for `position` (the absolute
        position of the token drawn); a seeded session is reseeded from it."""
        self.params.reseed(position)
        return self.sampler(logprobs)

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0


@dataclass(frozen=True)
class SampledToken:
    """A token the sampling stage picked, with what its session asked to know of it."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token, logprob) alternatives, most likely first
    logprobs: mx.array | None  # [vocab] float32, with full_logprobs only

    def to_message(self) -> pb.Sampled:
        """A new message."""
        out = pb.Sampled()
        self.to_proto(out)
        return out

    def to_proto(self, out: pb.Sampled) -> None:
        """Write into `out` (e.g. an element of a response's repeated field)."""
        out.token = self.token
        out.logprob = self.logprob
        out.top_tokens[:] = [t for t, _ in self.top]
        out.top_logprobs[:] = [p for _, p in self.top]
        if self.logprobs is not None:
            tensor.encode(self.logprobs, out.logprobs)

    @classmethod
    def from_proto(cls, msg: pb.Sampled) -> SampledToken:
        """Read a message.

        Raises:
            ValueError: the alternatives' lists differ in length, or the logprobs
                tensor is malformed.
        """
        if len(msg.top_tokens) != len(msg.top_logprobs):
            raise ValueError(
                f"Sampled has {len(msg.top_tokens)} top_tokens but "
                f"{len(msg.top_logprobs)} top_logprobs"
            )
        return cls(
            token=msg.token,
            logprob=msg.logprob,
            top=tuple(zip(msg.top_tokens, msg.top_logprobs, strict=True)),
            logprobs=tensor.decode(msg.logprobs) if msg.HasField("logprobs") else None,
        )
