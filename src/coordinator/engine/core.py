"""The engine: requests in, tokens out, through the chain's decode lanes.

`Engine.generate_tokens` mirrors mlx-lm's `generate_step`: prefill of all but
the last prompt token in chunks, then one step per token on the decode ring,
where the last stage runs the logits processors on the running token history,
logprobs = logits - logsumexp, and the sampler. So the cluster gives the tokens
and logprobs single-process mlx-lm gives (tests/test_golden.py).

With batching on there is a fixed set of lanes (one per stage by default) and
at most `max_batch` requests decode at once, first come first served; with it
off, every request gets a lane of its own. The KV admission queue (in the
chain) still decides who may open a session at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from mlx_cluster.contract.config import BatchingConfig
from mlx_cluster.contract.errors import InvalidArgument
from mlx_cluster.contract.sampling import SampledToken, SamplingParams
from mlx_cluster.contract.speculation import DraftStats, Speculation
from mlx_cluster.coordinator.engine.chain import Chain
from mlx_cluster.coordinator.engine.lanes import Lane, StepProfile
from mlx_cluster.coordinator.engine.prefixes import PromptReuse
from mlx_cluster.coordinator.engine.request import RequestState

STEP_TIMEOUT_S = 300.0  # one step through every worker; a worker that hangs fails it


class Engine:
    """The chain, its decode lanes, and the cap on requests decoding at once."""

    def __init__(
        self,
        chain: Chain,
        batching: BatchingConfig | None = None,
        step_timeout_s: float = STEP_TIMEOUT_S,
        speculative: Speculation | None = None,
    ) -> None:
        self.chain = chain
        self.batching = batching or BatchingConfig()
        self.speculative = speculative or Speculation()  # for requests that do not say
        self.step_timeout_s = step_timeout_s
        self.prefill_turn = max(len(chain.stages), 1)  # enough chunks to fill the stages
        count = self.batching.micro_batches or len(chain.stages)
        self.lanes = [self._lane(i) for i in range(count)] if self.batching.enabled else []
        self._places = asyncio.Semaphore(self.batching.max_batch)
        self._solo = 0  # lanes made for one request (batching off)
        self._retired = StepProfile()  # steps of those lanes, once they closed

    def _lane(self, index: int) -> Lane:
        return Lane(self.chain, index, self.step_timeout_s, self.prefill_turn)

    def profile(self) -> StepProfile:
        """Decode steps over all lanes: how many, how full, where their time went."""
        total = StepProfile()
        total.add(self._retired)
        for lane in self.lanes:
            total.add(lane.profile)
        return total

    @property
    def decoding(self) -> int:
        return sum(len(lane) for lane in self.lanes)

    async def generate_tokens(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        timeout: float | None = None,
        stop_tokens: Sequence[int] = (),
        stats: DraftStats | None = None,
        reuse: PromptReuse | None = None,
    ) -> AsyncGenerator[SampledToken, None]:
        """Yield up to params.max_tokens new tokens, each with its logprob (and what else
        `params` asks for); after one of `stop_tokens`, no more. No stop strings.

        Callers check the request first (generation.check_request). `timeout` bounds
        the wait for KV room; the caller's own deadline bounds the rest. `stats`, if
        given, counts the request's drafts as they are verified; `reuse` says how many
        prompt tokens came from a kept prefix (prefix cache). A request that ends well
        is kept as a prefix for later ones, where the chain keeps prefixes.
        """
        if not prompt:
            raise InvalidArgument("prompt must hold at least one token")
        if params.max_tokens <= 0:
            return
        request = RequestState.new(
            prompt,
            params,
            self.batching.prefill_chunk,
            stop_tokens,
            params.speculative or self.speculative,
            stats,
            self.chain.prefixes.match(prompt) if self.chain.prefixes is not None else None,
        )
        await self.chain.open(request, timeout)
        if reuse is not None:
            reuse.looked_up = self.chain.prefixes is not None
            reuse.cached_tokens = request.prefix.length if request.prefix else 0
        lane: Lane | None = None
        try:
            lane = await self._take_lane()
            lane.join(request)
            while (item := await request.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # One shielded coroutine, so that even when the caller is cancelled the lane
            # lets go of the request before its session ends, never after.
            await asyncio.shield(self._finish(request, lane, keep=lane is not None))

    async def keep_prompt(self, prompt: Sequence[int], timeout: float | None = None) -> None:
        """Prefill all but the prompt's last token once and keep it as a prefix, so that
        the requests for it that follow (n completions of one prompt) prefill nothing.
        Nothing where the chain keeps no prefixes, or keeps this one already."""
        if self.chain.prefixes is None or len(prompt) < 2:
            return
        match = self.chain.prefixes.match(prompt)
        chunk = self.batching.prefill_chunk
        request = RequestState.new(prompt, SamplingParams(max_tokens=1), chunk, prefix=match)
        if not request.to_prefill:
            return
        await self.chain.open(request, timeout)
        streams = self.chain.streams()
        request.failed = True  # until every chunk is cached on every stage
        try:
            await self.chain.prefill(streams, request, request.to_prefill)
            request.failed = False
        finally:
            await streams.close()
            await self.chain.end(request, keep=True)

    async def _take_lane(self) -> Lane:
        """The lane a new request joins: the emptiest, once one of `max_batch` places is
        free; with batching off, a lane of its own."""
        if not self.batching.enabled:
            self._solo += 1
            return self._lane(len(self.lanes) + self._solo)
        await self._places.acquire()
        return min(self.lanes, key=len)

    async def _finish(self, request: RequestState, lane: Lane | None, keep: bool) -> None:
        if lane is not None:
            await lane.release(request)
            if lane in self.lanes:
                self._places.release()
            else:
                await lane.close()
                self._retired.add(lane.profile)
        await self.chain.end(request, keep)

    async def close(self) -> None:
        await asyncio.gather(*(lane.close() for lane in self.lanes))
