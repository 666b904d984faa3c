"""A model served by a chain of workers: the Python API the HTTP layer wraps.

```python
cluster = await Cluster.start(Path("model-dir"), ["studio:50051", "mini:50051"])
async for chunk in cluster.generate("Hello", SamplingParams(max_tokens=64), chat=True):
    print(chunk.text, end="")
```

`Cluster.start` (workers by address) and `Cluster.from_config` (a config file's
spec) build the same `ClusterConfig` and start the same way (startup.py).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_cluster.contract.config import ClusterConfig
from mlx_cluster.contract.plan import ClusterPlan
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.contract.speculation import Speculation
from mlx_cluster.coordinator.engine.core import Engine
from mlx_cluster.coordinator.engine.discovery import Discovery
from mlx_cluster.coordinator.engine.events import EventBus
from mlx_cluster.coordinator.engine.generation import TextChunk, generate_text
from mlx_cluster.coordinator.engine.health import ClusterHealth
from mlx_cluster.coordinator.engine.stages import Stage, StageManager

READY_TIMEOUT_S = 120.0  # for every worker to answer its health check at start


@dataclass(eq=False)
class Cluster:
    """The tokenizer, the engine over the workers, and the spec and plan they were loaded by."""

    model: Path  # the coordinator's copy of the model directory
    engine: Engine
    tokenizer: TokenizerWrapper
    plan: ClusterPlan
    config: ClusterConfig
    discovery: Discovery | None = None  # finds workers that appear later (standbys)

    @property
    def model_id(self) -> str:
        return self.model.name

    @cached_property
    def created(self) -> int:
        """When the model was made (its config.json's time), as OpenAI's `created`."""
        return int((self.model / "config.json").stat().st_mtime)

    @property
    def context_length(self) -> int:
        """The longest sequence (prompt + new tokens) the cluster admits."""
        return self.plan.context_tokens

    @classmethod
    async def start(
        cls,
        model: Path | str,
        addresses: Sequence[str],
        layer_counts: Sequence[int] | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
        **sections: Any,
    ) -> Cluster:
        """Start on workers given by address (in chain order), layers split by counts.

        Args:
            model: a model directory (or a name `mlx-cluster models list` shows) that
                every worker and the coordinator can read.
            addresses: worker "host:port" (or "unix:PATH") addresses; the first gets the
                first layers.
            layer_counts: layers per worker; default an even split.
            ready_timeout: seconds to wait for every worker to answer.
            sections: any other part of the spec, as in the config file, e.g.
                `kv={"budget_tokens": 512, "max_session_tokens": 512}`,
                `auth={"token": ...}`, `batching=BatchingConfig(...)`.
        """
        from mlx_cluster.coordinator.engine.startup import local_spec

        spec = local_spec(model, addresses, layer_counts, **sections)
        return await cls.from_config(spec, ready_timeout)

    @classmethod
    async def from_config(
        cls, config: ClusterConfig, ready_timeout: float = READY_TIMEOUT_S
    ) -> Cluster:
        """Start from a validated config: connect, plan, check the workers' limits, load."""
        from mlx_cluster.coordinator.engine.startup import start_from_config

        return await start_from_config(config, ready_timeout)

    @property
    def stage_manager(self) -> StageManager:
        return self.engine.chain.stages

    @property
    def stages(self) -> list[Stage]:
        return self.stage_manager.stages

    @property
    def events(self) -> EventBus:
        """Hop and decode-step events, for metrics and benchmarks to subscribe to."""
        return self.engine.chain.events

    @property
    def vocab_size(self) -> int:
        return self.engine.chain.vocab_size

    @property
    def speculative(self) -> Speculation:
        """How requests that do not say draft their tokens (the `speculative` section)."""
        return self.engine.speculative

    async def health(self) -> ClusterHealth:
        """Every stage's worker asked now (concurrently, with a short deadline)."""
        return await self.stage_manager.health(self.model_id)

    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Token ids for a prompt: text (optionally as a one-message chat) or ids as given."""
        if not isinstance(prompt, str):
            return list(prompt)
        if chat:
            messages = [{"role": "user", "content": prompt}]
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        return list(self.tokenizer.encode(prompt))

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        chat: bool = False,
        timeout: float | None = None,
    ) -> AsyncGenerator[TextChunk, None]:
        """Stream the completion of `prompt` as TextChunks; the last has finish_reason."""
        tokens = self.encode(prompt, chat)
        return generate_text(self.engine, self.tokenizer, tokens, params, timeout)

    async def keep_prompt(self, prompt: Sequence[int], timeout: float | None = None) -> None:
        """Engine.keep_prompt: the prompt prefilled once for the completions that follow."""
        await self.engine.keep_prompt(prompt, timeout)

    async def close(self) -> None:
        if self.discovery is not None:
            await self.discovery.close()
        await self.engine.close()
        await self.stage_manager.close()
