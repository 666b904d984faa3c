"""One request's state in the cluster: its session, what the caches hold, how it samples.

The chain advances a request (`advance`) once every stage has cached a chunk
of its tokens; nothing else changes `history` or `offset`. The lane that
carries the request samples its tokens (`take`) and delivers them (`out`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import mlx.core as mx

from mlx_cluster.coordinator.engine.sampling import SamplingParams, TokenPicker

# What a request's queue carries: a token and its logprobs [vocab], an error, or the end.
Item = tuple[int, mx.array] | BaseException | None


@dataclass(eq=False)
class RequestState:
    """A request from its session's opening to its last token."""

    picker: TokenPicker
    max_tokens: int  # tokens to produce at most
    reserve_tokens: int  # KV each worker reserves for it: prompt + max_tokens
    to_prefill: list[mx.array]  # prompt chunks not yet sent, in order
    pending: mx.array  # the token to feed next [1]: the prompt's last, then each new one
    session_id: str = ""
    history: list[mx.array] = field(default_factory=list)  # chunks every stage has cached
    offset: int = 0  # tokens every stage has cached
    produced: int = 0
    out: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)
    leaving: bool = False  # the caller let go: leave at the next token boundary
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set once no lane carries it

    @classmethod
    def new(cls, prompt: Sequence[int], params: SamplingParams, chunk: int) -> RequestState:
        """A request for `prompt`: all but its last token prefilled in `chunk`-token steps.

        (mlx-lm's generate_step does the same: the last prompt token makes the first
        decode step, whose logits give the first new token.)
        """
        tokens = mx.array(list(prompt), dtype=mx.uint32)
        size, head = max(chunk, 1), len(prompt) - 1
        picker = TokenPicker(params)
        picker.feed(tokens[:head])
        return cls(
            picker=picker,
            max_tokens=params.max_tokens,
            reserve_tokens=len(prompt) + params.max_tokens,
            to_prefill=[tokens[i : min(i + size, head)] for i in range(0, head, size)],
            pending=tokens[head:],
        )

    @property
    def remaining(self) -> int:
        return self.max_tokens - self.produced

    def new_session(self) -> str:
        """A fresh session id (at the start, and when recovery reopens the session)."""
        self.session_id = uuid.uuid4().hex
        return self.session_id

    def advance(self, chunk: mx.array) -> None:
        """Every stage has cached `chunk` [L] for this request's session."""
        self.history.append(chunk)
        self.offset += chunk.shape[0]

    def take(self, token: mx.array, token_id: int, logprobs: mx.array) -> None:
        """Deliver a sampled token; it is the next one to feed."""
        self.pending = token
        self.produced += 1
        self.out.put_nowait((token_id, logprobs))
        if self.remaining <= 0:
            self.out.put_nowait(None)

    def fail(self, error: BaseException) -> None:
        self.out.put_nowait(error)
        self.gone.set()


def pick_rows(rows: list[RequestState], logits: mx.array) -> None:
    """Sample one token for each row from its logits row [B, vocab], with one host read."""
    picked = [r.picker.pick(r.pending, logits[i : i + 1]) for i, r in enumerate(rows)]
    tokens = mx.concatenate([token.reshape(1) for token, _ in picked]).astype(mx.uint32)
    mx.eval(tokens, [logprobs for _, logprobs in picked])
    ids = cast(list[int], tokens.tolist())
    for i, (row, (_, logprobs)) in enumerate(zip(rows, picked, strict=True)):
        row.take(tokens[i : i + 1], ids[i], logprobs.squeeze(0))
