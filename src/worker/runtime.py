"""A worker's state: its loaded stage and its sessions, with the checks every call makes.

A stage is a slice of layers, plus the token embedding on the first stage and the
final norm, LM head and each session's sampling state on the last.

Plain Python over MLX arrays; the servicer calls it from a single compute
thread, so MLX work never runs concurrently and needs no locks. Only `info()`
runs on the event loop: it reads the slice held (replaced whole, never changed
in place) and its sessions' totals (one snapshot, see SessionStore).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import mlx.core as mx

from mlx_cluster.contract.errors import ClusterError, InvalidArgument, NotLoaded
from mlx_cluster.contract.rpc import PACKAGE_VERSION, PROTOCOL_VERSION
from mlx_cluster.contract.sampling import SampledToken, SamplingParams, TokenPicker
from mlx_cluster.contract.worker_info import Capabilities, LoadedSlice, WorkerInfo
from mlx_cluster.models.slicing import LayerSlice, ModelEdges
from mlx_cluster.tensor.shared import SharedViews
from mlx_cluster.worker.drafter import check_draft_model
from mlx_cluster.worker.picking import (
    Picks,
    check_history_kept,
    feed_pickers,
    pickers_of,
    sample_rows,
    verify_rows,
)
from mlx_cluster.worker.sessions import SessionStore, StoreTotals
from mlx_cluster.worker.settings import WorkerSettings
from mlx_cluster.worker.stage import Loaded, check_load_request, read_stage, serve_stage

log = logging.getLogger(__name__)
T = TypeVar("T")


class WorkerRuntime:
    """The loaded layers and the sessions that use them."""

    def __init__(
        self, settings: WorkerSettings, capabilities: Capabilities, shared_memory_probe: str = ""
    ) -> None:
        """`shared_memory_probe`: the segment Info names for peers to try (tensor/shared.py)."""
        self.settings = settings
        self.capabilities = capabilities
        self.shared_memory_probe = shared_memory_probe
        # Hidden states peers put in shared memory, read here; None: this worker takes none.
        self.shared_views = SharedViews() if shared_memory_probe else None
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
        held: dict[str, Any] = loaded.info_fields() if loaded is not None else {}
        settings = self.settings
        return WorkerInfo(
            settings.name,
            PACKAGE_VERSION,
            PROTOCOL_VERSION,
            self.capabilities,
            settings.limits,
            **held,
            shared_memory_probe=self.shared_memory_probe,
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
        embedding: bool = False,
        head: bool = False,
        draft_model: str = "",
        prefix_cache_bytes: int = 0,
    ) -> LoadedSlice:
        """Load layers [start, end) of `model`, with the embedding and/or the head if asked,
        in place of the stage held; open sessions end.

        The request is checked in full (range, config, weights present) before the stage
        held is dropped, so a rejected load leaves the worker as it was; `on_unload` is
        called once it is dropped. The same stage held already keeps its weights. A
        budget or TTL of 0 keeps the worker's own default. The first stage may also hold
        a `draft_model` sharing the model's vocabulary (worker/drafter.py). Ended
        sessions may be kept as prefixes in up to `prefix_cache_bytes` (worker/prefixes.py).
        """
        check_load_request(model, start, end, session_ttl_s)
        draft_path = check_draft_model(draft_model, model, embedding) if draft_model else None
        capacity = (kv_budget_tokens or self.settings.kv_budget_tokens, prefix_cache_bytes)
        ttl = session_ttl_s or self.settings.session_ttl_s
        current = self.loaded
        if current is not None and current.holds(model, start, end, embedding, head):
            self.loaded = serve_stage(
                model, current.layer_slice, current.edges, self.settings, capacity, ttl
            )
            self.loaded = self.loaded.holding_drafter(draft_model, draft_path, current.drafter)
            log.info(
                "%s of %s held already: weights kept, %d sessions ended",
                current.describe(),
                model,
                len(current.sessions),
            )
            return LoadedSlice(self.info(), current.weight_bytes, reloaded=False)
        before = 0

        def drop_held_stage() -> None:
            nonlocal before
            self.unload()
            if on_unload is not None:
                on_unload()
            before = mx.get_active_memory()

        layer_slice, edges = read_stage(model, start, end, embedding, head, drop_held_stage)
        loaded = serve_stage(model, layer_slice, edges, self.settings, capacity, ttl)
        self.loaded = loaded = loaded.holding_drafter(draft_model, draft_path)
        used = mx.get_active_memory() - before
        layer_slice.warm_up()
        log.info(
            "loaded %s of %s: %.1f MB of weights",
            loaded.describe(),
            model,
            loaded.weight_bytes / 1e6,
        )
        return LoadedSlice(self.info(), max(used, loaded.weight_bytes), reloaded=True)

    def unload(self) -> None:
        self.loaded = None
        gc.collect()
        mx.clear_cache()

    def require_loaded(self) -> Loaded:
        if self.loaded is None:
            raise NotLoaded("no layers loaded: call LoadLayers first")
        return self.loaded

    # --- sessions --------------------------------------------------------------

    def open_session(
        self,
        session_id: str,
        reserve: int,
        lease_id: str = "",
        sampling: SamplingParams | None = None,
        prefix: tuple[str, int, list[int]] | None = None,
    ) -> StoreTotals:
        """Open a session (ended with `lease_id`, if given); returns the totals after.

        The stage holding the head keeps the session's sampling state (`sampling`, or
        greedy when None); other stages ignore `sampling`. With `prefix` (id, length,
        its tokens for the sampling state's processors) the session starts from a kept
        prefix (PrefixNotFound if it is not kept here).

        Raises:
            InvalidParam: `sampling` does not fit the model (top_k, logit_bias ids), or
                its constraint is one the grammar engine refuses.
        """
        loaded = self.require_loaded()
        picker = None
        if loaded.edges is not None and loaded.head:
            params = sampling or SamplingParams()
            params.check(loaded.edges.vocab_size)
            constraint = None
            if params.constraint is not None and loaded.grammars is not None:
                constraint = loaded.grammars.processor(params.constraint)
            picker = TokenPicker(params, constraint)
            if prefix and prefix[2]:
                picker.feed(mx.array(prefix[2], dtype=mx.uint32))
        loaded.sessions.open(session_id, reserve, lease_id, picker, prefix and prefix[:2])
        return loaded.sessions.totals()

    def truncate(self, session_id: str, length: int) -> int:
        return self.require_loaded().sessions.truncate(session_id, length)

    def end_sessions(
        self,
        session_ids: list[str],
        keep: Sequence[tuple[str, str, int]] = (),
        drop_prefixes: Sequence[str] = (),
    ) -> tuple[int, list[str]]:
        """SessionStore.end_keeping; nothing to end while no slice is held."""
        store = self.loaded.sessions if self.loaded else None
        return store.end_keeping(session_ids, keep, drop_prefixes) if store else (0, [])

    def whole_only(self, prefix_ids: list[str]) -> list[str]:
        """Those kept prefixes that can be started from only whole (PrefixStore)."""
        return self.loaded.sessions.prefixes.whole_only(prefix_ids) if self.loaded else []

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
        hidden: mx.array | None,
        offsets: list[int],
        last_position_only: bool,
        stream_id: int = 0,
        token_ids: mx.array | None = None,
        verifying: bool = False,
    ) -> mx.array:
        """One step for several sessions: hidden [B, L, D] -> [B, L or 1, D].

        Args:
            hidden: the previous stage's output; None on the first stage, which embeds
                `token_ids` instead.
            token_ids: [B, L] uint32, the tokens of the step's positions. The stage
                holding the head keeps them for its sessions' logits processors.
            verifying: the step feeds drafts for the last stage to verify.

        A step that fails inside the layers ends its sessions: their caches may hold
        more than the offsets recorded, and a replay must start them over.
        """
        loaded = self.require_loaded()
        sessions, x = loaded.begin_step(
            session_ids, hidden, offsets, token_ids, self.settings.max_batch
        )
        if token_ids is None:
            check_history_kept(sessions)
        out = self._guarded(
            loaded,
            session_ids,
            lambda: loaded.run_layers(sessions, x, last_position_only, verifying=verifying),
        )
        if token_ids is not None:
            feed_pickers(sessions, token_ids)
        for session in sessions:
            loaded.sessions.advance(session, x.shape[1], stream_id)
        return out

    def forward_sample(
        self,
        session_ids: list[str],
        hidden: mx.array | None,
        offsets: list[int],
        stream_id: int = 0,
        token_ids: mx.array | None = None,
    ) -> list[SampledToken]:
        """One step for several sessions on the last stage, then each row's next token.

        Row b feeds token_ids[b] ([B, L] uint32, required: the processors see them) at
        positions offsets[b] ... offsets[b] + L - 1 (`hidden` as for `forward`), and its
        session's picker draws the token of position offsets[b] + L from the last
        position's logits (a seeded session is reseeded from that position).

        Raises:
            InvalidArgument: this stage holds no head, or `token_ids` is missing.
        """
        picks = self.sample_lazily(session_ids, hidden, offsets, stream_id, token_ids)
        return self.read_picks(session_ids, picks)

    def sample_lazily(
        self,
        session_ids: list[str],
        hidden: mx.array | None,
        offsets: list[int],
        stream_id: int = 0,
        token_ids: mx.array | None = None,
    ) -> Picks:
        """`forward_sample`'s step, handed to the device and not read: its tokens are a
        lazy array the next step can be built on (the sessions count the step now)."""
        loaded, edges, token_ids = self._sampling_stage(token_ids)
        sessions, x = loaded.begin_step(
            session_ids, hidden, offsets, token_ids, self.settings.max_batch
        )
        pickers = pickers_of(sessions)
        positions = [offset + token_ids.shape[1] for offset in offsets]

        def step() -> Picks:
            # The head and the draw are built on the layers' lazy output: one evaluation
            # for the whole step (the caches' updates are part of what the draw needs).
            out = loaded.run_layers(sessions, x, last_position_only=True, evaluate=False)
            picks = sample_rows(edges, out, pickers, token_ids, positions)
            picks.start()
            return picks

        picks = self._guarded(loaded, session_ids, step)
        for session in sessions:
            loaded.sessions.advance(session, token_ids.shape[1], stream_id)
        return picks

    def verify_sample(
        self,
        session_ids: list[str],
        hidden: mx.array | None,
        offsets: list[int],
        stream_id: int = 0,
        token_ids: mx.array | None = None,
    ) -> list[list[SampledToken]]:
        """A step that fed drafts, on the last stage: each row's tokens (see
        picking.verify_rows). Each session keeps only the positions those tokens fed;
        the other stages forget the rest at their next step (`rewind`)."""
        loaded, edges, token_ids = self._sampling_stage(token_ids)
        sessions, x = loaded.begin_step(
            session_ids, hidden, offsets, token_ids, self.settings.max_batch
        )
        pickers = pickers_of(sessions)

        def step() -> list[list[SampledToken]]:
            out = loaded.run_layers(sessions, x, False, evaluate=False, verifying=True)
            return verify_rows(edges, out, pickers, token_ids, offsets)

        kept = self._guarded(loaded, session_ids, step)
        for session, offset, tokens in zip(sessions, offsets, kept, strict=True):
            loaded.sessions.advance(session, token_ids.shape[1], stream_id)
            loaded.sessions.rewind(session.session_id, offset + len(tokens))
        return kept

    def rewind(self, session_ids: list[str], offsets: list[int]) -> None:
        """Sessions forget the drafts their last step fed past these offsets."""
        store = self.require_loaded().sessions
        for session_id, offset in zip(session_ids, offsets, strict=True):
            store.rewind(session_id, offset)

    def _sampling_stage(self, token_ids: mx.array | None) -> tuple[Loaded, ModelEdges, mx.array]:
        """The stage, its edges and the step's token ids, for a step that samples."""
        loaded = self.require_loaded()
        if loaded.edges is None or not loaded.head:
            raise InvalidArgument(
                f"this worker holds {loaded.describe()}, not the LM head: it cannot sample "
                "(the last stage samples; load it with head=True)"
            )
        if token_ids is None:
            raise InvalidArgument("a sampling step needs the token_ids of its positions")
        return loaded, loaded.edges, token_ids

    def read_picks(self, session_ids: list[str], picks: Picks) -> list[SampledToken]:
        """Wait for a sampling step and read its tokens (a failure ends its sessions)."""
        return self._guarded(self.require_loaded(), session_ids, picks.read)

    def steps_back_exactly(self, session_ids: list[str]) -> bool:
        """Whether these open sessions' last positions can be forgotten exactly."""
        return all(self.require_loaded().sessions.get(s).steps_back_exactly for s in session_ids)

    def step_back(self, session_ids: list[str]) -> None:
        """Forget the last cached position of these sessions (those still open)."""
        if self.loaded is not None:
            self.loaded.sessions.step_back(session_ids)

    def _guarded(self, loaded: Loaded, session_ids: list[str], step: Callable[[], T]) -> T:
        """Run a step's compute; if it fails, end its sessions (their caches may hold
        more than their offsets say, and a replay must start them over)."""
        try:
            return step()
        except Exception as exc:
            loaded.sessions.end(session_ids)
            where = loaded.describe()
            log.error("step failed in %s, ended sessions %s", where, session_ids)
            raise ClusterError(
                f"the step failed in {where}: {exc!r:.300}; its "
                f"{len(session_ids)} session(s) were ended (open them again and replay)"
            ) from exc
