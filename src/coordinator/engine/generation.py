"""Generation through the pipeline: tokens as mlx-lm's generate_step makes them, then text.

`generate_tokens` mirrors mlx-lm's `generate_step` step for step (prefill of all
but the last prompt token in chunks, then one step per token, processors on
the running token history, logprobs = logits - logsumexp), so the pipeline
produces the tokens and logprobs single-process mlx-lm produces.
`generate_text` adds streaming detokenization, stop strings, end-of-sequence
and timing, and checks the request against the model (`check_request`) before
it opens a session.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import cast

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_cluster.contract.errors import InvalidArgument
from mlx_cluster.coordinator.engine.batching import Batcher
from mlx_cluster.coordinator.engine.pipeline import Pipeline, PipelineSession
from mlx_cluster.coordinator.engine.sampling import (
    InvalidParam,
    SamplingParams,
    TokenPicker,
    check_token_ids,
)

PREFILL_STEP_SIZE = 2048  # mlx-lm's default prompt chunk


def check_request(prompt: Sequence[int], params: SamplingParams, vocab_size: int) -> None:
    """Refuse a request the model cannot run: an empty prompt, or ids past the vocabulary.

    Raises:
        InvalidParam: naming the prompt, top_k or logit_bias, with the vocabulary size.
    """
    if not prompt:
        raise InvalidParam("prompt", "prompt must hold at least one token")
    check_token_ids("prompt", prompt, vocab_size)
    params.check(vocab_size)


async def generate_tokens(
    session: PipelineSession,
    prompt: Sequence[int],
    params: SamplingParams,
    prefill_step_size: int = PREFILL_STEP_SIZE,
    batcher: Batcher | None = None,
) -> AsyncGenerator[tuple[int, mx.array], None]:
    """Yield (token, logprobs [vocab]) for up to params.max_tokens new tokens; no stop logic.

    The prompt and the first new token always run for this session alone. With a
    batcher, later tokens come from its decode batches; without, from steps of
    this session alone. Callers check the request first (`check_request`), as
    generate_text does before it opens the session.
    """
    if not prompt:
        raise InvalidArgument("prompt must hold at least one token")
    picker = TokenPicker(params)
    tokens = mx.array(list(prompt), dtype=mx.uint32)
    size = max(prefill_step_size, 1)
    chunks = [tokens[i : min(i + size, len(prompt) - 1)] for i in range(0, len(prompt) - 1, size)]
    await session.prefill(chunks)
    picker.feed(tokens[: len(prompt) - 1])
    pending = tokens[len(prompt) - 1 :]
    logits = await session.logits(pending)
    token, logprobs = picker.pick(pending, logits)
    yield cast(int, token.item()), logprobs.squeeze(0)
    if batcher is not None:
        decoding = batcher.decode(session, picker, token, params.max_tokens - 1)
        async with contextlib.aclosing(decoding):  # leave the batch before the session ends
            async for step in decoding:
                yield step
        return
    for _ in range(params.max_tokens - 1):
        pending = token.reshape(1).astype(mx.uint32)
        logits = await session.logits(pending)
        token, logprobs = picker.pick(pending, logits)
        yield cast(int, token.item()), logprobs.squeeze(0)


@dataclass
class Performance:
    """Timing of one generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0  # request start to first token
    total_s: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else 0.0

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
    performance: Performance | None = None  # on the last chunk


class StopMatcher:
    """Holds back text that may be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; returns (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
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
    pipeline: Pipeline,
    tokenizer: TokenizerWrapper,
    prompt: Sequence[int],
    params: SamplingParams,
    timeout: float | None = None,
    batcher: Batcher | None = None,
    prefill_step_size: int = PREFILL_STEP_SIZE,
) -> AsyncGenerator[TextChunk, None]:
    """Generate text for a tokenized prompt, chunk by chunk; sessions end whatever happens.

    With a batcher, the request decodes in its batches (continuous batching).

    Raises:
        InvalidParam: from `check_request`, on the first iteration, before any
            worker holds a session for the request.
    """
    check_request(prompt, params, pipeline.edges.vocab_size)
    started = time.perf_counter()
    perf = Performance(prompt_tokens=len(prompt))
    detokenizer = tokenizer.detokenizer
    stops = StopMatcher(params.stop)
    eos = set() if params.ignore_eos else set(tokenizer.eos_token_ids)
    finish, stopped = "length", False
    async with (
        pipeline.session(len(prompt) + params.max_tokens, timeout) as session,
        contextlib.aclosing(
            generate_tokens(session, prompt, params, prefill_step_size, batcher)
        ) as steps,
    ):
        async for token, logprobs in steps:
            if not perf.ttft_s:
                perf.ttft_s = time.perf_counter() - started
            if token in eos:
                finish = "stop"
                break
            perf.completion_tokens += 1
            detokenizer.add_token(token)
            text, stopped = stops.feed(detokenizer.last_segment)
            chunk = TextChunk(text, token)
            if params.top_logprobs:  # what logprobs=true asks for; otherwise no read per token
                chunk.logprob = cast(float, logprobs[token].item())
                chunk.top_logprobs = _top(logprobs, params.top_logprobs)
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
    yield TextChunk(tail, finish_reason=finish, performance=perf)


def _top(logprobs: mx.array, k: int) -> list[tuple[int, float]]:
    ids = mx.argpartition(-logprobs, kth=k - 1)[:k]
    ids = ids[mx.argsort(-logprobs[ids])]
    id_list = cast(list[int], ids.tolist())
    value_list = cast(list[float], logprobs[ids].tolist())
    return list(zip(id_list, value_list, strict=True))
