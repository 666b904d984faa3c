"""The last stage's sampling: each session's picker, fed its tokens, and a step's draw.

A worker that holds the LM head keeps one TokenPicker per session (see
SessionStore.open). Its logits processors see every token the session's cache
holds, so every step brings its token ids: non-sampling steps feed them here, a
sampling step feeds them as its picker draws (`sample_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import mlx.core as mx

from mlx_cluster.contract.errors import InvalidArgument
from mlx_cluster.contract.sampling import Picks, SampledToken, TokenPicker
from mlx_cluster.models.slicing import ModelEdges
from mlx_cluster.worker.sessions import Session


def sample_rows(
    edges: ModelEdges,
    hidden: mx.array,
    pickers: Sequence[TokenPicker],
    token_ids: mx.array,
    positions: Sequence[int],
) -> Picks:
    """Each row's next token from hidden states [B, L, D] after the model's last layer,
    built and not yet read.

    The final norm and LM head run on each row's last position; row b's picker
    then feeds token_ids[b] [L] and draws the token of position positions[b].
    """
    logits = edges.head(hidden[:, -1:, :])[:, -1, :]
    # Only processors read a row's tokens: no slicing per row otherwise.
    processed = any(p.processors for p in pickers)
    inputs = [token_ids[row] for row in range(token_ids.shape[0])] if processed else []
    return Picks.build(pickers, inputs, logits, positions)


def verify_rows(
    edges: ModelEdges,
    hidden: mx.array,
    pickers: Sequence[TokenPicker],
    token_ids: mx.array,
    offsets: Sequence[int],
) -> list[list[SampledToken]]:
    """Each row's tokens from a step that fed drafts (speculative decoding).

    hidden [B, L, D] after the model's last layer; token_ids [B, L]: row b's last token,
    then its drafts. Every position is sampled as a step without drafts would sample it
    (the processors see the tokens fed up to it; a seeded session is reseeded by
    position), so row b keeps its tokens up to and including the first that differs
    from the draft that follows it: the tokens decoding without drafts gives.
    """
    logits = edges.head(hidden)
    rows, length = token_ids.shape
    processed = any(p.processors for p in pickers)
    steps = []
    for i in range(length):
        inputs = [token_ids[b, i : i + 1] for b in range(rows)] if processed else []
        positions = [offset + i + 1 for offset in offsets]
        steps.append(Picks.build(pickers, inputs, logits[:, i, :], positions))
    mx.eval([step.packed for step in steps])
    sampled = [step.read() for step in steps]
    fed = cast(list[list[int]], token_ids.tolist())
    kept: list[list[SampledToken]] = []
    for b in range(rows):
        row = []
        for i in range(length):
            row.append(sampled[i][b])
            if i + 1 == length or sampled[i][b].token != fed[b][i + 1]:
                break
        kept.append(row)
    return kept


def pickers_of(sessions: Sequence[Session]) -> list[TokenPicker]:
    """The sessions' pickers (every session opened on a stage with the head has one)."""
    for session in sessions:
        if session.picker is None:
            raise InvalidArgument(
                f"session {session.session_id!r} was opened without sampling state"
            )
    return [session.picker for session in sessions if session.picker is not None]


def feed_pickers(sessions: Sequence[Session], token_ids: mx.array) -> None:
    """Record a non-sampling step's tokens [B, L] in the pickers of its sessions."""
    for row, session in enumerate(sessions):
        if session.picker is not None:
            session.picker.feed(token_ids[row])


def check_history_kept(sessions: Sequence[Session]) -> None:
    """Refuse a step without token ids for a session whose processors need them all."""
    for session in sessions:
        if session.picker is not None and session.picker.processors:
            raise InvalidArgument(
                f"session {session.session_id!r} samples with logits processors (penalties "
                "or logit_bias), which see every token: each of its steps needs token_ids"
            )
