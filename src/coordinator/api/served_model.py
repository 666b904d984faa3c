"""The engine interface the HTTP API relies on, and nothing more of it.

`engine.cluster.Cluster` provides it; the API never reaches into pipelines,
stages or workers, so the engine may change behind these few members.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_cluster.contract.plan import ClusterPlan
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.contract.speculation import Speculation
from mlx_cluster.coordinator.engine.events import EventBus
from mlx_cluster.coordinator.engine.generation import TextChunk
from mlx_cluster.coordinator.engine.health import ClusterHealth


class ServedModel(Protocol):
    """A started cluster serving one model."""

    @property
    def model_id(self) -> str: ...

    @property
    def created(self) -> int: ...  # unix time, for /v1/models

    @property
    def context_length(self) -> int: ...  # tokens, prompt and output together

    @property
    def vocab_size(self) -> int: ...

    @property
    def speculative(self) -> Speculation: ...  # how requests that do not say draft

    @property
    def tokenizer(self) -> TokenizerWrapper: ...

    @property
    def plan(self) -> ClusterPlan: ...  # the layers, KV budgets and context it was started with

    @property
    def events(self) -> EventBus: ...

    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]: ...

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, /, *, timeout: float | None = None
    ) -> AsyncGenerator[TextChunk, None]: ...

    async def keep_prompt(self, prompt: Sequence[int], timeout: float | None = None) -> None: ...

    async def health(self) -> ClusterHealth: ...
