"""One request's state in the cluster: its session, what the caches hold, how it samples.

The chain advances a request (`advance`) once every stage has cached a chunk
of its tokens; nothing else changes `history` or `offset`. The last stage
samples its tokens with `params`; the lane that carries the request delivers
them (`take`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.sampling import SampledToken, SamplingParams
from mlx_cluster.contract.speculation import DraftStats, Speculation
from mlx_cluster.coordinator.engine.prefixes import PrefixMatch

# What a request's queue carries: a token, an error, or the end.
Item = SampledToken | BaseException | None


@dataclass(eq=False)
class RequestState:
    """A request from its session's opening to its last token."""

    params: SamplingParams
    max_tokens: int  # tokens to produce at most
    reserve_tokens: int  # KV each worker reserves for it: prompt + max_tokens
    to_prefill: list[mx.array]  # prompt chunks not yet sent, in order
    pending: int  # the token to feed next: the prompt's last, then each new one
    stop_tokens: tuple[int, ...] = ()  # the last stage stops the request after one of these
    speculation: Speculation = field(default_factory=Speculation)  # how its steps draft
    stats: DraftStats | None = None  # what its drafts earned, for whoever asked
    session_id: str = ""
    history: list[mx.array] = field(default_factory=list)  # chunks every stage has cached
    offset: int = 0  # tokens every stage has cached
    produced: int = 0
    out: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)
    leaving: bool = False  # the caller let go: leave at the next token boundary
    ended: bool = False  # its last item (the end, or an error) is queued
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set once no lane carries it
    prompt: tuple[int, ...] = ()
    chunk: int = 1  # prompt tokens a prefill step takes at most
    prefix: PrefixMatch | None = None  # a kept prefix its session starts from
    failed: bool = False  # ended by an error

    @classmethod
    def new(
        cls,
        prompt: Sequence[int],
        params: SamplingParams,
        chunk: int,
        stop_tokens: Sequence[int] = (),
        speculation: Speculation | None = None,
        stats: DraftStats | None = None,
        prefix: PrefixMatch | None = None,
    ) -> RequestState:
        """A request for `prompt`: all but its last token prefilled in `chunk`-token steps,
        after the first `prefix.length` if it starts from a kept prefix.

        (mlx-lm's generate_step does the same: the last prompt token makes the first
        decode step, whose logits give the first new token.)
        """
        request = cls(
            params=params.for_prompt(len(prompt)),
            max_tokens=params.max_tokens,
            reserve_tokens=len(prompt) + params.max_tokens,
            to_prefill=[],
            pending=int(prompt[-1]),
            stop_tokens=tuple(stop_tokens),
            speculation=speculation or Speculation(),
            stats=stats,
            prompt=tuple(prompt),
            chunk=max(chunk, 1),
        )
        request.start_from(prefix)
        return request

    def start_from(self, prefix: PrefixMatch | None) -> None:
        """Before its session opens: start from `prefix` (its tokens count as cached, in
        the steps that cached them) or, with None, from nothing."""
        tokens = mx.array(list(self.prompt), dtype=mx.uint32)
        self.prefix, self.history, self.offset = prefix, [], 0
        for size in prefix.chunks() if prefix else []:
            self.advance(tokens[self.offset : self.offset + size])
        head = len(self.prompt) - 1
        steps = range(self.offset, head, self.chunk)
        self.to_prefill = [tokens[i : min(i + self.chunk, head)] for i in steps]

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

    def decode_row(self) -> pb.DecodeRow:
        """This request as a row of the decode loop, from where its caches are (with the
        tokens they hold, when it drafts from them)."""
        row = pb.DecodeRow(
            session_id=self.session_id,
            offset=self.offset,
            token=self.pending,
            max_tokens=self.remaining,
            stop_tokens=self.stop_tokens,
        )
        if self.speculation.enabled:
            row.draft_tokens = self.speculation.num_draft_tokens
            row.draft_with_model = self.speculation.method == "draft"
            for chunk in self.history:
                row.context.extend(chunk.tolist())
        return row

    def drafted(self, drafted: int, accepted: int) -> None:
        """A decode step verified `drafted` of its drafts and kept `accepted`."""
        if self.stats is not None:
            self.stats.add(drafted, accepted)

    def stepped(self, sampled: SampledToken) -> None:
        """A decode step fed `pending` on every stage and the last stage sampled `sampled`."""
        self.advance(mx.array([self.pending], dtype=mx.uint32))
        self.take(sampled)

    def take(self, sampled: SampledToken) -> None:
        """Deliver a sampled token; it is the next one to feed."""
        if self.ended:
            return
        self.pending = sampled.token
        self.produced += 1
        self.out.put_nowait(sampled)
        if self.remaining <= 0:
            self.finish()

    def finish(self) -> None:
        """No more tokens: the end of the request's stream."""
        if not self.ended:
            self.ended = True
            self.out.put_nowait(None)

    def fail(self, error: BaseException) -> None:
        self.failed = True
        if not self.ended:
            self.ended = True
            self.out.put_nowait(error)
        self.gone.set()
