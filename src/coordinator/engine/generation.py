"""Text from the engine's tokens: detokenization, stop strings, end of sequence, timing.

The engine (core.py) makes the tokens as mlx-lm's generate_step would;
`generate_text` turns them into text chunks, and checks the request against
the model (`check_request`) before it opens a session.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_cluster.contract.errors import InvalidParam
from mlx_cluster.contract.sampling import SamplingParams, check_token_ids
from mlx_cluster.contract.speculation import DraftStats
from mlx_cluster.coordinator.engine.core import Engine
from mlx_cluster.coordinator.engine.prefixes import PromptReuse


def check_request(prompt: Sequence[int], params: SamplingParams, vocab_size: int) -> None:
    """Refuse a request the model cannot run: an empty prompt, or ids past the vocabulary.

    Raises:
        InvalidParam: naming the prompt, top_k or logit_bias, with the vocabulary size.
    """
    if not prompt:
        raise InvalidParam("prompt", "prompt must hold at least one token")
    check_token_ids("prompt", prompt, vocab_size)
    params.check(vocab_size)


@dataclass
class Performance:
    """Timing of one generation, and what its drafts earned."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0  # request start to first token
    total_s: float = 0.0
    draft_tokens: int = 0  # drafted tokens verified
    accepted_draft_tokens: int = 0  # of those, kept
    decode_steps: int = 0  # pipeline traversals that carried the request
    cached_prompt_tokens: int = 0  # prompt tokens a kept prefix gave (prefix cache)
    prefix_lookup: bool = False  # the cluster keeps prefixes: the prompt was looked up

    def count_drafts(self, stats: DraftStats) -> None:
        """Take the engine's count of the request's drafts and decode steps."""
        self.draft_tokens = stats.drafted
        self.accepted_draft_tokens = stats.accepted
        self.decode_steps = stats.traversals

    @classmethod
    def of_choices(cls, choices: Sequence[Performance]) -> Performance:
        """One request's figures over its n completions of one prompt: the prompt counted
        once, the completions' tokens and drafts summed, its first token the earliest."""
        first = choices[0]
        return cls(
            prompt_tokens=first.prompt_tokens,
            completion_tokens=sum(c.completion_tokens for c in choices),
            ttft_s=min(c.ttft_s for c in choices),
            total_s=max(c.total_s for c in choices),
            draft_tokens=sum(c.draft_tokens for c in choices),
            accepted_draft_tokens=sum(c.accepted_draft_tokens for c in choices),
            decode_steps=sum(c.decode_steps for c in choices),
            cached_prompt_tokens=first.cached_prompt_tokens,
            prefix_lookup=first.prefix_lookup,
        )

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens each decode step gave on average (above 1 only with accepted drafts)."""
        return self.completion_tokens / self.decode_steps if self.decode_steps > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        decode_s = self.total_s - self.ttft_s
        return (
            (self.completion_tokens - 1) / decode_s
            if self.completion_tokens > 1 and decode_s > 0
            else 0.0
        )


@dataclass
class TextChunk:
    """A piece of generated text; the last chunk has finish_reason set."""

    text: str
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" on the last chunk
    stop_sequence: str | None = None  # on the last chunk: the stop string that ended it
    choice: int = 0  # which of a request's n completions it belongs to
    performance: Performance | None = None  # on the last chunk


class StopMatcher:
    """Holds back text that may be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.pending = ""
        self.matched: str | None = None  # the stop string found, once one is

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; returns (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            out, self.pending = self.pending[:at], ""
            return out, True
        hold = max((self._overlap(s) for s in self.stops), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _overlap(self, stop: str) -> int:
        for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:n]):
                return n
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


async def generate_text(
    engine: Engine,
    tokenizer: TokenizerWrapper,
    prompt: Sequence[int],
    params: SamplingParams,
    timeout: float | None = None,
) -> AsyncGenerator[TextChunk, None]:
    """Generate text for a tokenized prompt, chunk by chunk; sessions end whatever happens.

    Raises:
        InvalidParam: from `check_request`, on the first iteration, before any
            worker holds a session for the request.
    """
    check_request(prompt, params, engine.chain.vocab_size)
    started = time.perf_counter()
    perf = Performance(prompt_tokens=len(prompt))
    detokenizer = tokenizer.detokenizer
    stops = StopMatcher(params.stop)
    eos = set() if params.ignore_eos else set(tokenizer.eos_token_ids)
    finish, stopped = "length", False
    drafts, reuse = DraftStats(), PromptReuse()
    tokens = engine.generate_tokens(prompt, params, timeout, sorted(eos), drafts, reuse)
    async with contextlib.aclosing(tokens) as steps:
        async for sampled in steps:
            token = sampled.token
            if not perf.ttft_s:
                perf.ttft_s = time.perf_counter() - started
            if token in eos:
                finish = "stop"
                break
            perf.completion_tokens += 1
            detokenizer.add_token(token)
            text, stopped = stops.feed(detokenizer.last_segment)
            chunk = TextChunk(text, token)
            if params.top_logprobs:  # what logprobs=true asks for
                chunk.logprob = sampled.logprob
                chunk.top_logprobs = list(sampled.top)
            yield chunk
            if stopped:
                finish = "stop"
                break
    tail = ""
    if not stopped:  # text the detokenizer or the stop matcher still holds
        detokenizer.finalize()
        tail, stopped = stops.feed(detokenizer.last_segment)
        tail += "" if stopped else stops.flush()
        finish = "stop" if stopped else finish
    perf.total_s = time.perf_counter() - started
    perf.count_drafts(drafts)
    perf.cached_prompt_tokens, perf.prefix_lookup = reuse.cached_tokens, reuse.looked_up
    yield TextChunk(tail, finish_reason=finish, stop_sequence=stops.matched, performance=perf)
