"""A worker's state: its loaded slice and its sessions, with the checks every call makes.

Plain Python over MLX arrays; the servicer calls it from a single compute
thread, so MLX work never runs concurrently and needs no locks. Only `info()`
runs on the event loop: it reads the slice held (replaced whole, never changed
in place) and its sessions' totals (one snapshot, see SessionStore).
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlx_cluster import tensor
from mlx_cluster.contract.errors import ClusterError, InvalidArgument, NotLoaded
from mlx_cluster.contract.rpc import PROTOCOL_VERSION
from mlx_cluster.contract.worker_info import Capabilities, LoadedSlice, WorkerInfo
from mlx_cluster.models.slicing import LayerSlice, load_layer_slice
from mlx_cluster.models.sources import resolve_model
from mlx_cluster.worker.batching import batch_for, can_batch
from mlx_cluster.worker.compute import forward_batch, forward_rows
from mlx_cluster.worker.sessions import Session, SessionStore, StoreTotals
from mlx_cluster.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

try:
    from importlib.metadata import version as _dist_version

    VERSION = _dist_version("mlx-cluster")
except Exception:  # running from a source tree without an install
    VERSION = "0.0.0+source"


@dataclass(frozen=True)
class Loaded:
    """The slice held and the sessions using it."""

    model: str  # as LoadLayers named it
    layer_slice: LayerSlice
    sessions: SessionStore
    batch_decode: bool  # decode steps of several sessions run as one batch

    def holds(self, model: str, start: int, end: int) -> bool:
        return (self.model, self.layer_slice.start, self.layer_slice.end) == (model, start, end)


class WorkerRuntime:
    """The loaded layers and the sessions that use them."""

    def __init__(self, settings: WorkerSettings, capabilities: Capabilities) -> None:
        self.settings = settings
        self.capabilities = capabilities
        self.loaded: Loaded | None = None

    @property
    def layer_slice(self) -> LayerSlice | None:
        return self.loaded.layer_slice if self.loaded else None

    @property
    def sessions(self) -> SessionStore | None:
        return self.loaded.sessions if self.loaded else None

    def info(self) -> WorkerInfo:
        """What Info reports; safe to call from any thread."""
        loaded = self.loaded
        held: dict[str, Any] = {}
        if loaded is not None:
            s, totals = loaded.layer_slice, loaded.sessions.totals()
            held = {
                "model": loaded.model,
                "layer_start": s.start,
                "layer_end": s.end,
                "model_num_layers": s.num_layers,
                "weight_bytes": s.weight_bytes,
                "kv_capacity_tokens": totals.capacity,
                "kv_used_tokens": totals.used,
                "sessions_open": totals.sessions,
                "dtype": tensor.dtype_name(s.dtype),
                "hidden_size": s.hidden_size,
            }
        settings = self.settings
        return WorkerInfo(
            settings.name, VERSION, PROTOCOL_VERSION, self.capabilities, settings.limits, **held
        )

    # --- loading ---------------------------------------------------------------

    def load(
        self,
        model: str,
        start: int,
        end: int,
        kv_budget_tokens: int = 0,
        session_ttl_s: float = 0,
        on_unload: Callable[[], None] | None = None,
    ) -> LoadedSlice:
        """Load layers [start, end) of `model` in place of the slice held; open sessions end.

        The request is checked in full (range, config, weights present) before the slice
        held is dropped, so a rejected load leaves the worker as it was; `on_unload` is
        called once it is dropped. The slice held already keeps its weights. A budget or
        TTL of 0 keeps the worker's own default.
        """
        _check_load_request(model, start, end, session_ttl_s)
        capacity = kv_budget_tokens or self.settings.kv_budget_tokens
        ttl = session_ttl_s or self.settings.session_ttl_s
        current = self.loaded
        if current is not None and current.holds(model, start, end):
            self.loaded = self._serve(model, current.layer_slice, capacity, ttl)
            log.info(
                "layers [%d, %d) of %s held already: weights kept, %d sessions ended",
                start,
                end,
                model,
                len(current.sessions),
            )
            return LoadedSlice(self.info(), current.layer_slice.weight_bytes, reloaded=False)
        return self._load_new(model, start, end, capacity, ttl, on_unload)

    def _load_new(
        self,
        model: str,
        start: int,
        end: int,
        capacity: int,
        ttl: float,
        on_unload: Callable[[], None] | None,
    ) -> LoadedSlice:
        before = 0

        def drop_held_slice() -> None:
            nonlocal before
            self.unload()
            if on_unload is not None:
                on_unload()
            before = mx.get_active_memory()

        layer_slice = self._read_slice(model, start, end, drop_held_slice)
        self.loaded = self._serve(model, layer_slice, capacity, ttl)
        used = mx.get_active_memory() - before
        log.info(
            "loaded layers [%d, %d) of %s: %.1f MB of weights",
            start,
            end,
            model,
            layer_slice.weight_bytes / 1e6,
        )
        return LoadedSlice(self.info(), max(used, layer_slice.weight_bytes), reloaded=True)

    def _read_slice(
        self, model: str, start: int, end: int, before_reading: Callable[[], None]
    ) -> LayerSlice:
        try:
            path = resolve_model(model, layers=range(start, end))
            return load_layer_slice(path, start, end, before_reading)
        except (ValueError, OSError) as exc:  # bad range, missing files, unknown architecture
            raise InvalidArgument(str(exc)) from exc
        except (KeyError, TypeError, AttributeError) as exc:  # a config.json mlx-lm cannot read
            raise InvalidArgument(
                f"cannot load {model!r}: its config.json is not a model config ({exc!r})"
            ) from exc

    def _serve(self, model: str, layer_slice: LayerSlice, capacity: int, ttl: float) -> Loaded:
        """The slice with a new, empty session store."""
        layer_slice.eval_every = self.settings.layer_eval_every(metal=mx.metal.is_available())
        store = SessionStore(
            capacity, layer_slice.make_caches, ttl, max_sessions=self.settings.max_sessions
        )
        batch = self.settings.batch_decode and can_batch(layer_slice.cache_templates)
        return Loaded(model, layer_slice, store, batch)

    def unload(self) -> None:
        self.loaded = None
        gc.collect()
        mx.clear_cache()

    def require_loaded(self) -> Loaded:
        if self.loaded is None:
            raise NotLoaded("no layers loaded: call LoadLayers first")
        return self.loaded

    # --- sessions --------------------------------------------------------------

    def open_session(self, session_id: str, reserve: int, lease_id: str = "") -> StoreTotals:
        """Open a session (ended with `lease_id`, if given); returns the totals after."""
        store = self.require_loaded().sessions
        store.open(session_id, reserve, lease_id)
        return store.totals()

    def truncate(self, session_id: str, length: int) -> int:
        return self.require_loaded().sessions.truncate(session_id, length)

    def end_sessions(self, session_ids: list[str]) -> int:
        """End sessions; unknown ids (or no slice held) are no error. Returns how many were open."""
        return self.loaded.sessions.end(session_ids) if self.loaded else 0

    def end_lease(self, lease_id: str) -> list[str]:
        """End the sessions of a lease no Lease call holds any more; returns their ids."""
        ended = self.loaded.sessions.end_lease(lease_id) if self.loaded else []
        if ended:
            log.warning(
                "lease %r lapsed (its coordinator is gone): ended its %d sessions %s",
                lease_id,
                len(ended),
                ended,
            )
        return ended

    def end_stream(self, stream_id: int, why: str) -> list[str]:
        """End the sessions last stepped on a Forward call that ended badly; returns their ids."""
        ended = self.loaded.sessions.end_stream(stream_id) if self.loaded else []
        if ended:
            log.warning(
                "Forward call %d %s: ended the %d sessions last stepped on it: %s",
                stream_id,
                why,
                len(ended),
                ended,
            )
        return ended

    def evict_idle(self) -> list[str]:
        evicted = self.loaded.sessions.evict_idle() if self.loaded else []
        if evicted:
            log.info("evicted %d idle sessions: %s", len(evicted), evicted)
        return evicted

    # --- stepping --------------------------------------------------------------

    def forward(
        self,
        session_ids: list[str],
        hidden: mx.array,
        offsets: list[int],
        last_position_only: bool,
        stream_id: int = 0,
    ) -> mx.array:
        """One step for several sessions: hidden [B, L, D] -> [B, L or 1, D].

        A step that fails inside the layers ends its sessions: their caches may hold
        more than the offsets recorded, and a replay must start them over.
        """
        loaded = self.require_loaded()
        store = loaded.sessions
        self._check_step_shape(loaded.layer_slice, session_ids, hidden, offsets)
        new_tokens = hidden.shape[1]
        sessions = [store.get(sid) for sid in session_ids]
        store.check_step(sessions, offsets, new_tokens)
        try:
            out = _run_layers(loaded, sessions, hidden, last_position_only)
        except Exception as exc:
            store.end(session_ids)
            s = loaded.layer_slice
            log.error(
                "step failed in layers [%d, %d), ended sessions %s", s.start, s.end, session_ids
            )
            raise ClusterError(
                f"the step failed in layers [{s.start}, {s.end}): {exc!r:.300}; its "
                f"{len(session_ids)} session(s) were ended (open them again and replay)"
            ) from exc
        for session in sessions:
            store.advance(session, new_tokens, stream_id)
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


def _check_load_request(model: str, start: int, end: int, session_ttl_s: float) -> None:
    if not model:
        raise InvalidArgument("model must name a model directory")
    if not (math.isfinite(session_ttl_s) and session_ttl_s >= 0):
        raise InvalidArgument(f"session_ttl_s must be a finite number >= 0, got {session_ttl_s}")
    if end <= start:
        raise InvalidArgument(f"layer range [{start}, {end}) is empty")


def _run_layers(
    loaded: Loaded, sessions: list[Session], hidden: mx.array, last_position_only: bool
) -> mx.array:
    """The step through the slice: decode steps of several sessions as one batch if allowed."""
    if hidden.shape[1] == 1 and len(sessions) > 1 and loaded.batch_decode:
        group, rows = batch_for(sessions)
        return forward_batch(loaded.layer_slice, hidden, group.caches, rows)
    caches = [s.own_caches() for s in sessions]
    return forward_rows(loaded.layer_slice, hidden, caches, last_position_only)
