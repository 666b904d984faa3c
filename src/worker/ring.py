"""The decode loop of the first stage: token in, token out, with no coordinator in between.

Each step feeds every row's token through the ring (this stage's layers, then
the stages after it, the last of which samples) and the sampled tokens are fed
into the next step at once. A row that drafts (speculative decoding) feeds its
drafts after its token, and the last stage answers the tokens it verified.
Rows join and leave by command between two steps; a row also leaves on its own
after its `max_tokens` tokens or a stop token.
Every step is reported as one event, which names the rows that left since the
previous one, so the caller knows when no step carries a session any more.

The loop knows nothing of gRPC or MLX: `step` runs one step through the ring.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from mlx_cluster.contract.errors import ClusterError, InvalidArgument
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.speculation import (
    MAX_DRAFT_TOKENS,
    DraftLength,
    PromptLookup,
    StepCosts,
)
from mlx_cluster.worker.sessions import check_id

log = logging.getLogger(__name__)

# A row whose context is longer indexes it for prompt lookup in a thread (~1.5 ms per
# thousand tokens here), so that the worker's other calls are not held meanwhile.
THREAD_CONTEXT = 8192


@dataclass(frozen=True)
class StepResult:
    """One step through the ring: row b's sampled tokens (one, unless it fed drafts), and
    where the time went."""

    rows: list[list[pb.Sampled]]
    stage_compute_s: list[float]  # each stage's compute, in chain order
    relay_s: float  # the rest of the time after this stage's compute

    @property
    def compute_s(self) -> float:
        """Every stage's compute, summed."""
        return sum(self.stage_compute_s)


# (session ids, offsets, tokens to feed, ahead) -> the step's result. Row b feeds
# tokens[b]: its last token, then any drafts (every row as long). `ahead`: the next step
# will most likely carry the same rows, one token each (no row is at its last token and
# none fed drafts), so a stage that can may start it before this one is read.
RingStep = Callable[[list[str], list[int], list[list[int]], bool], Awaitable[StepResult]]
# (session id, its tokens so far, how many) for each row that drafts with the first
# stage's draft model -> each row's drafts.
ModelDrafts = Callable[[list[tuple[str, list[int], int]]], Awaitable[list[list[int]]]]
# Steps the loop may run ahead of the caller reading their events (see DecodeLoop.pump).
EVENTS_AHEAD = 8


@dataclass
class Row:
    """A session in the loop: what its cache holds, what it feeds next, how it drafts."""

    session_id: str
    offset: int
    token: int
    remaining: int
    stop_tokens: frozenset[int]
    lookup: PromptLookup | None = None  # its tokens so far, with drafting on
    draft_length: DraftLength | None = None
    with_model: bool = False  # drafts come from the draft model, not from lookup

    @classmethod
    def from_proto(cls, row: pb.DecodeRow) -> Row:
        if row.max_tokens < 1:
            raise InvalidArgument(
                f"a decode row needs max_tokens >= 1, got {row.max_tokens} for a session"
            )
        if row.draft_tokens > MAX_DRAFT_TOKENS:
            raise InvalidArgument(
                f"a decode row drafts at most {MAX_DRAFT_TOKENS} tokens a step, "
                f"got {row.draft_tokens}"
            )
        made = cls(
            row.session_id, row.offset, row.token, row.max_tokens, frozenset(row.stop_tokens)
        )
        if row.draft_tokens:
            made.lookup = PromptLookup([*row.context, row.token])
            made.draft_length = DraftLength(row.draft_tokens)
            made.with_model = row.draft_with_model
        return made

    def draft_count(self, costs: StepCosts, rows: int) -> int:
        """How many tokens it drafts for the next step of `rows` rows (none past its last)."""
        if self.draft_length is None:
            return 0
        return min(self.draft_length.next(costs, rows), self.remaining - 1)


class DecodeLoop:
    """Rows stepping together through the ring until they leave; commands between steps."""

    def __init__(
        self, step: RingStep, max_rows: int, model_drafts: ModelDrafts | None = None
    ) -> None:
        self._step = step
        self._max_rows = max_rows
        self._model_drafts = model_drafts  # None: this stage holds no draft model
        self.rows: dict[str, Row] = {}
        self.seen: set[str] = set()  # every session ever added (ended if the call breaks)
        # a command, a failure to raise between two steps, or None: the caller is done
        self._commands: asyncio.Queue[pb.DecodeCommand | ClusterError | None] = asyncio.Queue()
        self._left: list[str] = []  # since the last event
        self._costs = StepCosts()  # what steps of each shape cost (drafting weighs it)

    def command(self, command: pb.DecodeCommand) -> None:
        """Queue a command; it is applied before the next step."""
        self._commands.put_nowait(command)

    def close(self) -> None:
        """The caller is done: stop after the step in progress."""
        self._commands.put_nowait(None)

    def fail(self, error: ClusterError) -> None:
        """Raise `error` from `events` after the step in progress (a bad command)."""
        self._commands.put_nowait(error)

    async def events(self) -> AsyncIterator[pb.DecodeEvent]:
        """One event per step until `close`; an event without a step reports rows that
        left while none was running."""
        while True:
            if not await self._apply_commands():
                if self._left:
                    yield pb.DecodeEvent(left=self._take_left())
                return
            if not self.rows:  # nothing to step: report who left, if anyone did
                if self._left:
                    yield pb.DecodeEvent(left=self._take_left())
                continue
            rows = list(self.rows.values())
            started = time.perf_counter()  # a step's cost includes drafting for it
            drafts = await self._drafts(rows)
            length = 1 + max(len(d) for d in drafts)
            # Shorter rows are padded: a padded position is verified like a draft.
            fed = [
                [r.token, *d] + [r.token] * (length - 1 - len(d))
                for r, d in zip(rows, drafts, strict=True)
            ]
            ahead = length == 1 and all(r.remaining > 1 for r in rows)
            result = await self._step(
                [r.session_id for r in rows], [r.offset for r in rows], fed, ahead
            )
            self._costs.add(len(rows), length, time.perf_counter() - started)
            if len(result.rows) != len(rows) or not all(result.rows):
                raise InvalidArgument(
                    f"the last stage answered {[len(r) for r in result.rows]} tokens "
                    f"for {len(rows)} rows"
                )
            taken = [self._advance(row, got) for row, got in zip(rows, result.rows, strict=True)]
            for row, drafted, got in zip(rows, drafts, result.rows, strict=True):
                if row.draft_length is not None:
                    row.draft_length.update(len(drafted), min(len(got) - 1, len(drafted)))
            yield pb.DecodeEvent(
                session_ids=[r.session_id for r in rows],
                sampled=[token for row in taken for token in row],
                counts=[len(row) for row in taken] if length > 1 else [],
                drafted=[len(d) for d in drafts] if length > 1 else [],
                left=self._take_left(),
                compute_seconds=result.compute_s,
                stage_compute_seconds=result.stage_compute_s,
                relay_seconds=result.relay_s,
            )

    async def pump(self, events: asyncio.Queue[pb.DecodeEvent | Exception | None]) -> None:
        """The events into `events`, then None; or the error that ended the loop.

        Run as a task of its own, the loop starts its next step as soon as a step's
        tokens are in, while the event reporting them is still being written.
        """
        try:
            async for event in self.events():
                await events.put(event)
        except Exception as exc:
            await events.put(exc)
            return
        await events.put(None)

    async def read_commands(self, commands: AsyncIterator[pb.DecodeCommand]) -> None:
        """Queue the caller's commands until it half-closes (then `close`); a command that
        names a malformed session id fails the loop between two steps."""
        try:
            async for command in commands:
                for row in command.add:
                    check_id(row.session_id)
                for session_id in command.drop:
                    check_id(session_id)
                self.command(command)
        except ClusterError as exc:
            self.fail(exc)
            return
        except Exception as exc:  # bytes that are no DecodeCommand, or the call ended
            log.debug("Decode commands ended: %r", exc)
        self.close()

    async def _drafts(self, rows: list[Row]) -> list[list[int]]:
        """Each row's drafts for the next step: from its own tokens (prompt lookup), or
        from the draft model, asked once for all the rows that use it."""
        counts = [r.draft_count(self._costs, len(rows)) for r in rows]
        drafts = [
            r.lookup.drafts(n) if r.lookup is not None and not r.with_model else []
            for r, n in zip(rows, counts, strict=True)
        ]
        asks = [
            (i, (r.session_id, r.lookup.tokens, n))
            for i, (r, n) in enumerate(zip(rows, counts, strict=True))
            if r.with_model and r.lookup is not None and n > 0
        ]
        if asks and self._model_drafts is not None:
            drafted = await self._model_drafts([ask for _, ask in asks])
            for (i, _), tokens in zip(asks, drafted, strict=True):
                drafts[i] = tokens[: counts[i]]
        return drafts

    def _advance(self, row: Row, tokens: list[pb.Sampled]) -> list[pb.Sampled]:
        """The row took `tokens` in order (each fed what it follows); the ones it kept:
        none after its last or a stop token, where it leaves."""
        for n, sampled in enumerate(tokens):
            row.offset += 1
            row.token = sampled.token
            row.remaining -= 1
            if row.lookup is not None:
                row.lookup.extend([sampled.token])
            if row.remaining <= 0 or sampled.token in row.stop_tokens:
                self._leave(row.session_id)
                return tokens[: n + 1]
        return tokens

    def _leave(self, session_id: str) -> None:
        if self.rows.pop(session_id, None) is not None:
            self._left.append(session_id)

    def _take_left(self) -> list[str]:
        left, self._left = self._left, []
        return left

    async def _apply_commands(self) -> bool:
        """Apply every queued command, waiting for one while no row is left and nothing
        is to be reported. Returns False once the caller is done."""
        while self._commands.empty() and not self.rows and not self._left:
            if not await self._apply(await self._commands.get()):
                return False
        while not self._commands.empty():
            if not await self._apply(self._commands.get_nowait()):
                return False
        return True

    async def _apply(self, command: pb.DecodeCommand | ClusterError | None) -> bool:
        if command is None:
            return False
        if isinstance(command, ClusterError):
            raise command
        for session_id in command.drop:
            self._leave(session_id)
        for added in command.add:
            if added.session_id in self.rows:
                raise InvalidArgument("a decode row names a session already in the loop")
            if len(self.rows) >= self._max_rows:
                raise InvalidArgument(
                    f"the decode loop holds {len(self.rows)} rows, at most {self._max_rows}"
                )
            if added.draft_with_model and self._model_drafts is None:
                raise InvalidArgument(
                    "a decode row drafts with the draft model, and this stage holds none"
                )
            if len(added.context) > THREAD_CONTEXT:  # its lookup index: off the event loop
                self.rows[added.session_id] = await asyncio.to_thread(Row.from_proto, added)
            else:
                self.rows[added.session_id] = Row.from_proto(added)
            self.seen.add(added.session_id)
        return True
