"""A ring of one stage steps the way mlx-lm's generate_step does: one step ahead.

When one worker holds the whole model, its decode loop needs no other stage:
step n+1 can be built on step n's tokens while they are still a lazy array, and
handed to the device before step n is read. The device then never waits for
the host between two steps, which is what makes mlx-lm's loop fast.

A step computed ahead is taken when the loop's next step carries the same rows
at the next positions with the tokens it was built on; otherwise (a row joined
or left, the loop ended) its sessions forget its position, so their caches hold
exactly what the loop fed them. Only sessions whose caches can forget a
position exactly (`Session.steps_back_exactly`) are stepped ahead.

Everything here runs on the compute thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

from mlx_cluster.contract.errors import ClusterError
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.sampling import SampledToken
from mlx_cluster.worker import steps
from mlx_cluster.worker.picking import Picks
from mlx_cluster.worker.runtime import WorkerRuntime


@dataclass
class _Ahead:
    """A step built on the previous step's tokens, on the device, not read."""

    session_ids: list[str]
    offsets: list[int]  # the positions it feeds
    picks: Picks
    fed: list[int] | None = None  # the tokens it was built on, once they are read


class LookAhead:
    """One Decode call's steps on a worker that is the whole ring."""

    def __init__(self, runtime: WorkerRuntime, stream_id: int) -> None:
        self._runtime = runtime
        self._stream_id = stream_id
        self._ahead: _Ahead | None = None
        self.taken = 0  # steps computed ahead and taken
        self.dropped = 0  # and not taken

    def step(
        self, session_ids: list[str], offsets: list[int], tokens: list[int], ahead: bool
    ) -> tuple[list[SampledToken], float]:
        """Each row's next token from feeding `tokens` at `offsets`, and the seconds it
        took; with `ahead`, the step after it is built and started first."""
        started = time.perf_counter()
        current = self._take(session_ids, offsets, tokens)
        if current is None:
            token_ids = mx.array(tokens, dtype=mx.uint32)[:, None]
            current = self._runtime.sample_lazily(
                session_ids, None, offsets, self._stream_id, token_ids
            )
        if ahead:
            self._start_next(session_ids, offsets, current)
        sampled = self._read(session_ids, current)
        if self._ahead is not None:
            self._ahead.fed = [s.token for s in sampled]
        return sampled, time.perf_counter() - started

    def verify(
        self, session_ids: list[str], offsets: list[int], tokens: list[list[int]]
    ) -> tuple[list[list[pb.Sampled]], float]:
        """A step that feeds drafts (never computed ahead): each row's verified tokens,
        and the seconds it took."""
        self.discard()
        return steps.verify_alone(self._runtime, session_ids, offsets, tokens, self._stream_id)

    def discard(self) -> None:
        """Forget the step computed ahead, if any (its sessions step back)."""
        if self._ahead is not None:
            self._runtime.step_back(self._ahead.session_ids)
            self._ahead = None
            self.dropped += 1

    def _take(self, session_ids: list[str], offsets: list[int], tokens: list[int]) -> Picks | None:
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        if ahead.session_ids == session_ids and ahead.offsets == offsets and ahead.fed == tokens:
            self.taken += 1
            return ahead.picks
        self._ahead = ahead
        self.discard()
        return None

    def _start_next(self, session_ids: list[str], offsets: list[int], current: Picks) -> None:
        """Build the next step on `current`'s lazy tokens and start it, where every
        session can step back from it exactly."""
        if not self._runtime.steps_back_exactly(session_ids):
            return
        following = [offset + 1 for offset in offsets]
        try:
            picks = self._runtime.sample_lazily(
                session_ids, None, following, self._stream_id, current.tokens[:, None]
            )
        except ClusterError:  # no room for one more token, say: the next step will tell
            return
        self._ahead = _Ahead(session_ids, following, picks)

    def _read(self, session_ids: list[str], picks: Picks) -> list[SampledToken]:
        try:
            return self._runtime.read_picks(session_ids, picks)
        except Exception:
            self._ahead = None  # built on what failed; its sessions end with the failure
            raise
