"""One Decode call's steps: the first stage's part on the compute thread, the rest relayed.

A ring of one stage (this worker holds the whole model) steps one step ahead, as
mlx-lm's generate_step does (lookahead.py); a longer ring hands this stage's
hidden states to the next stage and waits for the last stage's tokens.
"""

from __future__ import annotations

from mlx_cluster.contract.errors import InvalidArgument
from mlx_cluster.worker import steps
from mlx_cluster.worker.compute_thread import ComputeThread
from mlx_cluster.worker.lookahead import LookAhead
from mlx_cluster.worker.relay import NextStage
from mlx_cluster.worker.ring import ModelDrafts, StepResult
from mlx_cluster.worker.runtime import WorkerRuntime


class RingSteps:
    """The RingStep of one Decode call (see ring.DecodeLoop)."""

    def __init__(
        self,
        compute: ComputeThread,
        runtime: WorkerRuntime,
        next_stage: NextStage | None,
        stream_id: int,
    ) -> None:
        self._compute = compute
        self._runtime = runtime
        self._next_stage = next_stage
        self._stream_id = stream_id
        self._lookahead = LookAhead(runtime, stream_id) if next_stage is None else None

    async def __call__(
        self, ids: list[str], offsets: list[int], tokens: list[list[int]], ahead: bool
    ) -> StepResult:
        """One step through the ring; a failure here or further down raises (ClusterError,
        RelayFailed naming the stage), for the Decode call to answer with."""
        if self._lookahead is not None:
            return await self._alone(ids, offsets, tokens, ahead)
        assert self._next_stage is not None
        job = self._compute.submit(
            steps.ring_first, self._runtime, ids, offsets, tokens, self._stream_id
        )
        try:
            onward, compute_s = await job
        except ValueError as exc:  # bytes that are no tensor, say
            raise InvalidArgument(str(exc)) from exc
        reply, relay_s = await self._next_stage.step(onward)
        stages = list(reply.stage_compute_seconds) or [reply.compute_seconds]
        return StepResult(steps.split_rows(reply), [compute_s, *stages], relay_s - sum(stages))

    async def _alone(
        self, ids: list[str], offsets: list[int], tokens: list[list[int]], ahead: bool
    ) -> StepResult:
        """A step on a stage that is the whole ring."""
        assert self._lookahead is not None
        if len(tokens[0]) > 1:  # drafts to verify
            rows, compute_s = await self._compute.submit(
                self._lookahead.verify, ids, offsets, tokens
            )
            return StepResult(rows, [compute_s], 0.0)
        sampled, compute_s = await self._compute.submit(
            self._lookahead.step, ids, offsets, [row[0] for row in tokens], ahead
        )
        return StepResult([[token.to_message()] for token in sampled], [compute_s], 0.0)

    def model_drafts(self) -> ModelDrafts | None:
        """Drafts from this stage's draft model, on the compute thread; None without one."""
        loaded = self._runtime.loaded
        if loaded is None or loaded.drafter is None:
            return None
        draft = loaded.draft

        async def drafts(asks: list[tuple[str, list[int], int]]) -> list[list[int]]:
            return await self._compute.submit(draft, asks)

        return drafts

    def close(self) -> None:
        """The call is over: a step computed ahead is not taken (queued, not awaited)."""
        if self._lookahead is not None:
            self._compute.post(self._lookahead.discard)
