"""A small draft model on the first stage: it proposes the tokens a decode step verifies.

The first stage runs the decode loop and knows every row's tokens, so the draft
model lives there (speculative decoding's `draft` method). It drafts greedily:
its tokens only decide how many of the model's own tokens one traversal gives,
never which (see contract/speculation.py). Each session keeps the draft model's
cache beside its own (`Session.draft`); before drafting, the cache forgets what
the session's tokens no longer hold (drafts that were rejected) and takes in
what it has not seen, so it always matches the session's tokens.

Runs on the compute thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.utils import load_model

from mlx_cluster.contract.errors import InvalidArgument
from mlx_cluster.models.architecture import inner_model
from mlx_cluster.models.short_steps import ShortStepAttention, route_attention, short_step_views
from mlx_cluster.models.sources import resolve_model
from mlx_cluster.worker.sessions import Session

PREFILL_CHUNK = 512  # tokens the draft model takes in at once when it catches up


@dataclass
class DraftState:
    """One session's draft cache and the tokens it holds."""

    cache: list[Any]
    fed: list[int] = field(default_factory=list)


def vocab_size(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config", {})
    return int(config.get("vocab_size") or text.get("vocab_size") or 0)


def check_draft_model(draft: str, model: str, embedding: bool) -> Path:
    """The draft model's directory, if it shares `model`'s vocabulary and goes to the
    first stage (`embedding`), which runs the decode loop.

    Raises:
        InvalidArgument: not the first stage, the draft model cannot be found or read, or
            its vocabulary differs.
    """
    if not embedding:
        raise InvalidArgument(
            "a draft model goes with the first stage (embedding=True), which runs the decode loop"
        )
    try:
        path = resolve_model(draft)
        mine, theirs = vocab_size(path), vocab_size(resolve_model(model))
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidArgument(f"cannot read the draft model {draft!r}: {exc}") from exc
    if mine != theirs:
        raise InvalidArgument(
            f"the draft model {draft!r} has a vocabulary of {mine} tokens, the model "
            f"{theirs}: drafts must come from the same tokenizer"
        )
    return path


class DraftModel:
    """A whole small model that drafts tokens greedily for the sessions of one stage."""

    def __init__(
        self, name: str, model: nn.Module, short_steps: ShortStepAttention = "fused"
    ) -> None:
        self.name = name
        self.model = model
        self.short_steps: ShortStepAttention = short_steps  # as the stage's
        if short_steps == "padded":
            route_attention(inner_model(model).layers)

    @classmethod
    def load(cls, name: str, path: Path, short_steps: ShortStepAttention = "fused") -> DraftModel:
        model, _ = load_model(path)
        return cls(name, model, short_steps)

    def _run(self, tokens: list[int] | mx.array, cache: list[Any]) -> mx.array:
        inputs = tokens if isinstance(tokens, mx.array) else mx.array([tokens], dtype=mx.uint32)
        views = short_step_views(cache, inputs.shape[1], self.short_steps)
        return self.model(inputs, cache=views)

    def drafts(self, session: Session, tokens: list[int], count: int) -> list[int]:
        """Up to `count` tokens that may follow `tokens` (the session's tokens so far)."""
        if count <= 0 or not tokens:
            return []
        state = self._state(session, tokens)
        logits = self._catch_up(state, tokens)
        drafted = []
        for n in range(count):
            token = mx.argmax(logits[:, -1, :], axis=-1)
            drafted.append(token)
            if n + 1 < count:  # built lazily: one evaluation for the whole draft
                logits = self._run(token[:, None], state.cache)
        values = cast(list[int], mx.concatenate(drafted).tolist())
        state.fed.extend(values[:-1])
        return values

    def _state(self, session: Session, tokens: list[int]) -> DraftState:
        """The session's draft cache, cut back to the longest prefix of `tokens` it holds
        (one token short at least: the last is fed again to draft from)."""
        state: DraftState | None = session.draft
        if state is None:
            state = session.draft = DraftState(make_prompt_cache(self.model))
        keep = 0
        for held, token in zip(state.fed, tokens[:-1], strict=False):
            if held != token:
                break
            keep += 1
        surplus = len(state.fed) - keep
        if surplus and not can_trim_prompt_cache(state.cache):
            state = session.draft = DraftState(make_prompt_cache(self.model))
        elif surplus:
            trim_prompt_cache(state.cache, surplus)
            del state.fed[keep:]
        return state

    def _catch_up(self, state: DraftState, tokens: list[int]) -> mx.array:
        """Feed the tokens the cache has not seen; the logits after the last."""
        new = tokens[len(state.fed) :]
        for start in range(0, len(new) - PREFILL_CHUNK, PREFILL_CHUNK):
            self._run(new[start : start + PREFILL_CHUNK], state.cache)
            mx.eval([c.state for c in state.cache])
        tail = new[(max(len(new) - 1, 0) // PREFILL_CHUNK) * PREFILL_CHUNK :]
        state.fed.extend(new)
        return self._run(tail, state.cache)
