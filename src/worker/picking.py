"""The last stage's sampling: each session's picker, fed its tokens, and a step's draw.

A worker that holds the LM head keeps one TokenPicker per session (see
SessionStore.open). Its logits processors see every token the session's cache
holds, so every step brings its token ids: non-sampling steps feed them here, a
sampling step feeds them as its picker draws (`sample_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from mlx_cluster.contract.errors import InvalidArgument
from mlx_cluster.contract.sampling import Picks, TokenPicker
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
