"""The stage a worker holds (its layers, and the edges of the first and last stage), how
its sessions' steps run through it, and how a LoadLayers request for one is checked
and read from disk."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx

from mlx_cluster import tensor
from mlx_cluster.contract.errors import InvalidArgument
from mlx_cluster.models.slicing import LayerSlice, ModelEdges, load_stage
from mlx_cluster.models.sources import resolve_model
from mlx_cluster.worker.batching import batch_for, can_batch
from mlx_cluster.worker.compute import (
    check_hidden,
    check_rows,
    check_token_ids,
    forward_batch,
    forward_rows,
)
from mlx_cluster.worker.constraint import Grammars
from mlx_cluster.worker.drafter import DraftModel
from mlx_cluster.worker.prefixes import PrefixStore, can_keep
from mlx_cluster.worker.sessions import Session, SessionStore
from mlx_cluster.worker.settings import WorkerSettings


@dataclass(frozen=True)
class Loaded:
    """The stage held and the sessions using it."""

    model: str  # as LoadLayers named it
    layer_slice: LayerSlice
    sessions: SessionStore
    batch_decode: bool  # decode steps of several sessions run as one batch
    edges: ModelEdges | None = None  # the embedding and/or the final norm and LM head
    drafter: DraftModel | None = None  # on the first stage: a small model that drafts tokens
    grammars: Grammars | None = None  # on the last stage: constrained sessions' matchers

    @property
    def embedding(self) -> bool:
        """Holds the token embedding: the first stage."""
        return self.edges is not None and self.edges.holds_embedding

    @property
    def head(self) -> bool:
        """Holds the final norm and LM head, and samples: the last stage."""
        return self.edges is not None and self.edges.holds_head

    @property
    def weight_bytes(self) -> int:
        return self.layer_slice.weight_bytes + (self.edges.weight_bytes if self.edges else 0)

    def info_fields(self) -> dict[str, Any]:
        """What Info reports of this stage and its sessions (WorkerInfo's fields)."""
        s, totals, kept = self.layer_slice, self.sessions.totals(), self.sessions.prefixes.totals()
        return {
            "model": self.model,
            "layer_start": s.start,
            "layer_end": s.end,
            "model_num_layers": s.num_layers,
            "weight_bytes": self.weight_bytes,
            "kv_capacity_tokens": totals.capacity,
            "kv_used_tokens": totals.used,
            "sessions_open": totals.sessions,
            "dtype": tensor.dtype_name(s.dtype),
            "hidden_size": s.hidden_size,
            "embedding": self.embedding,
            "head": self.head,
            "prefixes": kept.prefixes,
            "prefix_tokens": kept.tokens,
            "prefix_bytes": kept.nbytes,
            "prefix_capacity_bytes": kept.capacity_bytes,
        }

    def holds(self, model: str, start: int, end: int, embedding: bool, head: bool) -> bool:
        held = (self.layer_slice.start, self.layer_slice.end, self.embedding, self.head)
        return self.model == model and held == (start, end, embedding, head)

    def run_layers(
        self,
        sessions: list[Session],
        hidden: mx.array,
        last_position_only: bool,
        evaluate: bool = True,
        verifying: bool = False,
    ) -> mx.array:
        """A step of these sessions through the slice: decode steps of several sessions
        as one batch if allowed (see compute.py); `verifying`: it verifies drafts."""
        if hidden.shape[1] == 1 and len(sessions) > 1 and self.batch_decode:
            group, rows = batch_for(sessions)
            return forward_batch(self.layer_slice, hidden, group.caches, rows, evaluate)
        caches = [s.own_caches() for s in sessions]
        return forward_rows(
            self.layer_slice, hidden, caches, last_position_only, evaluate, verifying
        )

    def begin_step(
        self,
        session_ids: list[str],
        hidden: mx.array | None,
        offsets: list[int],
        token_ids: mx.array | None,
        max_batch: int,
    ) -> tuple[list[Session], mx.array]:
        """Check a step's inputs and sessions; its sessions, and the hidden states to run
        (the embedded `token_ids` when `hidden` is None)."""
        s = self.layer_slice
        check_rows(session_ids, offsets, max_batch)
        if hidden is not None:
            check_hidden(hidden, len(session_ids), s.hidden_size, s.dtype)
        elif token_ids is None:
            raise InvalidArgument("a step needs hidden states or token_ids")
        elif self.edges is None or not self.embedding:
            raise InvalidArgument(
                f"this worker holds {self.describe()}, not the embedding: send hidden "
                "states, or token_ids to the first stage (loaded with embedding=True)"
            )
        if token_ids is not None:
            length = hidden.shape[1] if hidden is not None else None
            # The ids index the embedding or, in the processors, the logits.
            vocab = self.edges.vocab_size if self.edges is not None else None
            check_token_ids(token_ids, len(session_ids), length, vocab)
        sessions = [self.sessions.get(sid) for sid in session_ids]
        if hidden is None:
            hidden = cast(ModelEdges, self.edges).embed(cast(mx.array, token_ids))
        self.sessions.check_step(sessions, offsets, hidden.shape[1])
        return sessions, hidden

    def holding_drafter(
        self, name: str, path: Path | None, current: DraftModel | None = None
    ) -> Loaded:
        """This stage with the draft model `name` (from `path`; `current` if it is that
        one already), or none when `name` is empty."""
        if not name or path is None:
            return dataclasses.replace(self, drafter=None)
        keep = current is not None and current.name == name
        how = self.layer_slice.short_steps
        drafter = current if keep else DraftModel.load(name, path, how)
        return dataclasses.replace(self, drafter=drafter)

    def draft(self, requests: list[tuple[str, list[int], int]]) -> list[list[int]]:
        """Drafts for each (session id, its tokens so far, how many) from the draft model."""
        if self.drafter is None:
            raise InvalidArgument(
                f"this worker holds {self.describe()} and no draft model: load the first "
                "stage with draft_model to draft with a model"
            )
        drafter = self.drafter
        return [drafter.drafts(self.sessions.get(sid), tokens, n) for sid, tokens, n in requests]

    def describe(self) -> str:
        """e.g. "layers [0, 4) with the embedding", for messages."""
        s = self.layer_slice
        parts = (("the embedding", self.embedding), ("the head", self.head))
        held = [name for name, holds in parts if holds]
        return f"layers [{s.start}, {s.end})" + (f" with {' and '.join(held)}" if held else "")


def serve_stage(
    model: str,
    layer_slice: LayerSlice,
    edges: ModelEdges | None,
    settings: WorkerSettings,
    capacity: tuple[int, int],
    ttl: float,
) -> Loaded:
    """The stage with a new, empty session store (capacity: KV tokens, prefix bytes), run
    as the worker's settings say."""
    layer_slice.eval_every = settings.layer_eval_every(metal=mx.metal.is_available())
    layer_slice.short_steps = settings.short_steps()
    tokens, prefix_bytes = capacity
    prefixes = PrefixStore(prefix_bytes if can_keep(layer_slice.cache_templates) else 0)
    most = settings.max_sessions
    store = SessionStore(tokens, layer_slice.make_caches, ttl, most, prefixes=prefixes)
    batch = settings.batch_decode and can_batch(layer_slice.cache_templates)
    grammars = Grammars(model, edges.vocab_size) if edges and edges.holds_head else None
    return Loaded(model, layer_slice, store, batch, edges, grammars=grammars)


def read_stage(
    model: str,
    start: int,
    end: int,
    embedding: bool,
    head: bool,
    before_reading: Callable[[], None],
) -> tuple[LayerSlice, ModelEdges | None]:
    """Layers [start, end) of `model`, and the edges asked for; a model or range that
    cannot be read is InvalidArgument. `before_reading` runs once all is checked."""
    try:
        path = resolve_model(model, layers=range(start, end), edges=embedding or head)
        return load_stage(path, start, end, embedding, head, before_reading)
    except (ValueError, OSError) as exc:  # bad range, missing files, unknown architecture
        raise InvalidArgument(str(exc)) from exc
    except (KeyError, TypeError, AttributeError) as exc:  # a config.json mlx-lm cannot read
        raise InvalidArgument(
            f"cannot load {model!r}: its config.json is not a model config ({exc!r})"
        ) from exc


def check_load_request(model: str, start: int, end: int, session_ttl_s: float) -> None:
    """Refuse a LoadLayers request that names no model, an empty range or a bad TTL."""
    if not model:
        raise InvalidArgument("model must name a model directory")
    if not (math.isfinite(session_ttl_s) and session_ttl_s >= 0):
        raise InvalidArgument(f"session_ttl_s must be a finite number >= 0, got {session_ttl_s}")
    if end <= start:
        raise InvalidArgument(f"layer range [{start}, {end}) is empty")
