"""What every route of one app shares: the cluster, the limits, the metrics, the drain.

`create_app` builds one ApiState and keeps it on `app.state`; a route asks for
it with the `State` dependency.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from mlx_cluster.contract.config import LimitsConfig
from mlx_cluster.coordinator.api.live_figures import LiveFigures
from mlx_cluster.coordinator.api.metrics import Metrics
from mlx_cluster.coordinator.api.responses import Drain, Generation, metered
from mlx_cluster.coordinator.api.served_model import ServedModel
from mlx_cluster.coordinator.api.settle import Prepared


@dataclass
class ApiState:
    cluster: ServedModel
    limits: LimitsConfig  # what one request may ask for
    metrics: Metrics = field(default_factory=Metrics)  # this app's own Prometheus registry
    drain: Drain = field(default_factory=Drain)  # the server's shutdown deadline
    live: LiveFigures = field(default_factory=LiveFigures)  # the dashboard's recent figures

    def generate(self, prepared: Prepared) -> Generation:
        """Run a settled request under its deadline and the drain, recording metrics.

        Raises:
            ApiError: 503 when the server is shutting down.
        """
        self.drain.refuse_new()
        timeout = self.limits.request_timeout_s
        deadline = prepared.started + timeout
        chunks = self.cluster.generate(prepared.tokens, prepared.params, timeout=timeout)
        metered_chunks = metered(chunks, deadline, self.drain, self.metrics, self.live)
        return Generation(metered_chunks, deadline, self.limits.send_timeout_s)

    async def generate_choices(self, prepared: Prepared) -> list[Generation]:
        """A generation for each of the request's n completions. Choice i of a seeded
        request is seeded seed + i. The prompt is prefilled once first, where the
        cluster keeps prefixes, and every completion starts from it."""
        if prepared.choices == 1:
            return [self.generate(prepared)]
        self.drain.refuse_new()
        await self.cluster.keep_prompt(prepared.tokens, timeout=self.limits.request_timeout_s)
        seed, params = prepared.params.seed, prepared.params
        return [
            self.generate(
                dataclasses.replace(
                    prepared,
                    params=dataclasses.replace(params, seed=None if seed is None else seed + i),
                )
            )
            for i in range(prepared.choices)
        ]

    def token_text(self, token: int) -> str:
        return str(self.cluster.tokenizer.decode([token]))


def state_of(app: FastAPI) -> ApiState:
    """The ApiState `create_app` stored on `app`."""
    state: ApiState = app.state.api
    return state


def _request_state(request: Request) -> ApiState:
    return state_of(request.app)


State = Annotated[ApiState, Depends(_request_state)]
