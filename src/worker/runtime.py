"""A worker's state: its loaded slice and its sessions, with the checks every call makes.

Plain Python over MLX arrays; the servicer calls it from a single compute
thread, so MLX work never runs concurrently and needs no locks.
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass

import mlx.core as mx

from mlx_cluster.contract.errors import InvalidArgument, NotLoaded
from mlx_cluster.contract.rpc import MAX_MESSAGE_BYTES
from mlx_cluster.models.slicing import LayerSlice, load_layer_slice
from mlx_cluster.models.sources import resolve_model
from mlx_cluster.worker.batching import batch_for, can_batch
from mlx_cluster.worker.capabilities import Capabilities
from mlx_cluster.worker.compute import forward_batch, forward_rows
from mlx_cluster.worker.sessions import SessionStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """Settings a worker starts with."""

    name: str
    kv_budget_tokens: int = 65_536  # default total cached tokens when LoadLayers gives 0
    session_ttl_s: float = 600.0  # sessions idle this long are evicted
    max_batch: int = 64  # sessions in one Forward step
    batch_decode: bool = True  # decode steps of several sessions as one batch
    max_sessions: int = 256  # sessions open at once; more get RESOURCE_EXHAUSTED
    max_message_bytes: int = MAX_MESSAGE_BYTES  # largest gRPC message, in or out
    # Start computing every this many layers of a step while the rest is built (0: at the
    # end). Measured on an H100, 8B-shaped bf16, 2 workers: 4 cut a decode token's compute
    # by about 2.5 ms (20%) and changed nothing for batches of 8 (benchmarks/RESULTS.md).
    eval_every: int = 4


@dataclass(frozen=True)
class LoadResult:
    reloaded: bool
    memory_used_bytes: int


class WorkerRuntime:
    """The loaded layers and the sessions that use them."""

    def __init__(self, settings: WorkerSettings, capabilities: Capabilities) -> None:
        self.settings = settings
        self.capabilities = capabilities
        self.model = ""
        self.layer_slice: LayerSlice | None = None
        self.sessions: SessionStore | None = None
        self._batch_decode = False  # the slice's caches can be batched (and settings allow)

    # --- loading ---------------------------------------------------------------

    def load(
        self, model: str, start: int, end: int, kv_budget_tokens: int = 0, session_ttl_s: float = 0
    ) -> LoadResult:
        """Load layers [start, end) of `model`; a new range frees the old one first.

        A budget or TTL of 0 keeps the worker's own default.
        """
        if not model:
            raise InvalidArgument("model must name a model directory")
        if not (math.isfinite(session_ttl_s) and session_ttl_s >= 0):
            raise InvalidArgument(
                f"session_ttl_s must be a finite number >= 0, got {session_ttl_s}"
            )
        capacity = kv_budget_tokens or self.settings.kv_budget_tokens
        ttl = session_ttl_s or self.settings.session_ttl_s
        current = self.layer_slice
        if current and (self.model, current.start, current.end) == (model, start, end):
            if self.sessions is not None:
                self.sessions.capacity, self.sessions.idle_ttl_s = capacity, ttl
            return LoadResult(reloaded=False, memory_used_bytes=current.weight_bytes)
        if end <= start:
            raise InvalidArgument(f"layer range [{start}, {end}) is empty")
        self.unload()
        before = mx.get_active_memory()
        try:
            path = resolve_model(model, layers=range(start, end))
            loaded = load_layer_slice(path, start, end)
        except (ValueError, OSError) as exc:  # bad range, missing files, unknown architecture
            raise InvalidArgument(str(exc)) from exc
        except (KeyError, TypeError, AttributeError) as exc:  # a config.json mlx-lm cannot read
            raise InvalidArgument(
                f"cannot load {model!r}: its config.json is not a model config ({exc!r})"
            ) from exc
        loaded.eval_every = self.settings.eval_every
        self.model, self.layer_slice = model, loaded
        self._batch_decode = self.settings.batch_decode and can_batch(loaded.cache_templates)
        self.sessions = SessionStore(
            capacity, loaded.make_caches, ttl, max_sessions=self.settings.max_sessions
        )
        used = mx.get_active_memory() - before
        log.info(
            "loaded layers [%d, %d) of %s: %.1f MB of weights",
            start,
            end,
            model,
            loaded.weight_bytes / 1e6,
        )
        return LoadResult(reloaded=True, memory_used_bytes=max(used, loaded.weight_bytes))

    def unload(self) -> None:
        self.model, self.layer_slice, self.sessions = "", None, None
        gc.collect()
        mx.clear_cache()

    def require_loaded(self) -> tuple[LayerSlice, SessionStore]:
        if self.layer_slice is None or self.sessions is None:
            raise NotLoaded("no layers loaded: call LoadLayers first")
        return self.layer_slice, self.sessions

    # --- stepping --------------------------------------------------------------

    def forward(
        self,
        session_ids: list[str],
        hidden: mx.array,
        offsets: list[int],
        last_position_only: bool,
    ) -> mx.array:
        """One step for several sessions: hidden [B, L, D] -> [B, L or 1, D]."""
        layer_slice, store = self.require_loaded()
        self._check_step_shape(layer_slice, session_ids, hidden, offsets)
        new_tokens = hidden.shape[1]
        sessions = [store.get(sid) for sid in session_ids]
        store.check_step(sessions, offsets, new_tokens)
        if new_tokens == 1 and len(sessions) > 1 and self._batch_decode:
            group, rows = batch_for(sessions)
            out = forward_batch(layer_slice, hidden, group.caches, rows)
        else:
            caches = [s.own_caches() for s in sessions]
            out = forward_rows(layer_slice, hidden, caches, last_position_only)
        for session in sessions:
            store.advance(session, new_tokens)
        return out

    def _check_step_shape(
        self, layer_slice: LayerSlice, session_ids: list[str], hidden: mx.array, offsets: list[int]
    ) -> None:
        if not session_ids:
            raise InvalidArgument("a step needs at least one session id")
        if len(session_ids) > self.settings.max_batch:
            raise InvalidArgument(
                f"{len(session_ids)} sessions in one step, at most {self.settings.max_batch}"
            )
        if len(set(session_ids)) != len(session_ids):
            raise InvalidArgument("a step names the same session twice")
        if len(offsets) != len(session_ids):
            raise InvalidArgument(f"{len(session_ids)} session ids but {len(offsets)} offsets")
        expected = (len(session_ids), "L>=1", layer_slice.hidden_size)
        if hidden.ndim != 3 or hidden.shape[0] != len(session_ids) or hidden.shape[1] < 1:
            raise InvalidArgument(
                f"hidden states must be [B, L, D] = {expected}, got {hidden.shape}"
            )
        if hidden.shape[2] != layer_slice.hidden_size:
            raise InvalidArgument(
                f"hidden size must be {layer_slice.hidden_size}, got {hidden.shape[2]}"
            )
        if hidden.dtype != layer_slice.dtype:
            raise InvalidArgument(f"hidden states must be {layer_slice.dtype}, got {hidden.dtype}")
