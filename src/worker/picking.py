"""The last stage's sampling: each session's picker, fed its tokens, and a step's draw.

A worker that holds the LM head keeps one TokenPicker per session (see
SessionStore.open). Its logits processors see every token the session's cache
holds, so every step brings its token ids: non-sampling steps feed them here, a
sampling step feeds them as its picker draws (`sample_rows`). A step's draw is
built first and read later (`Picks`), so that a worker holding the whole model
can build the next step on tokens still being computed; a step that fed drafts
samples every position (`verify_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import mlx.core as mx

from mlx_cluster.contract.errors import InvalidArgument
from mlx_cluster.contract.sampling import SampledToken, TokenPicker
from mlx_cluster.models.slicing import ModelEdges
from mlx_cluster.worker.sessions import Session


@dataclass(frozen=True)
class Picks:
    """A sampling step built but not read: its tokens are a lazy array the next step can
    be built on before they are known (what mlx-lm's generate_step does)."""

    tokens: mx.array  # [B] uint32, lazy
    packed: mx.array  # tokens, their logprobs, the alternatives' ids and logprobs
    full: list[mx.array | None]  # row b's [vocab] logprobs where its session asked for them
    top_logprobs: list[int]  # row b's number of alternatives
    k: int  # alternatives per row in `packed`

    @classmethod
    def build(
        cls,
        pickers: Sequence[TokenPicker],
        inputs: Sequence[mx.array],
        logits: mx.array,
        positions: Sequence[int],
    ) -> Picks:
        """One token for each row of `logits` [B, vocab], drawn by that row's picker.

        The whole step is one batched operation: processors run on the rows of sessions
        that have them, then logprobs, greedy draws, the drawn tokens' logprobs and the
        alternatives for every row at once; only sessions that sample at a temperature
        draw on their own (each with its sampler, seeded by position). `read` evaluates
        everything at once and reads it back in one host read.

        Args:
            pickers: row b's sampling state.
            inputs: row b's tokens of this step [L], fed to its picker (read only where a
                session has processors; may be empty otherwise).
            positions: row b's position of the token drawn (see TokenPicker.draw).
        """
        if any(p.processors for p in pickers):
            logits = mx.concatenate(
                [p.process(inputs[b], logits[b : b + 1]) for b, p in enumerate(pickers)]
            )
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = _draw(pickers, logprobs, positions)
        chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
        k = max(p.params.top_logprobs for p in pickers)
        top_ids, top_values = _top(logprobs, k)
        full = [
            logprobs[b].astype(mx.float32) if p.params.full_logprobs else None
            for b, p in enumerate(pickers)
        ]
        # Token ids are below 2**24, exact in float32: one array, one read.
        packed = mx.concatenate(
            [
                tokens.astype(mx.float32),
                chosen.astype(mx.float32),
                top_ids.astype(mx.float32).flatten(),
                top_values.flatten(),
            ]
        )
        return cls(tokens, packed, full, [p.params.top_logprobs for p in pickers], k)

    def arrays(self) -> list[mx.array]:
        """What evaluating the step computes."""
        return [self.packed, *(f for f in self.full if f is not None)]

    def start(self) -> None:
        """Hand the step to the device without waiting for it."""
        mx.async_eval(self.arrays())

    def read(self) -> list[SampledToken]:
        """Evaluate the step and read each row's token."""
        mx.eval(self.arrays())
        values = cast(list[float], self.packed.tolist())
        rows, k = len(self.full), self.k
        ids, logprob = values[:rows], values[rows : 2 * rows]
        top = values[2 * rows :]
        result = []
        for b, kb in enumerate(self.top_logprobs):
            at_ids, at_values = b * k, rows * k + b * k
            alternatives = tuple(
                (int(top[at_ids + i]), top[at_values + i]) for i in range(min(kb, k))
            )
            result.append(SampledToken(int(ids[b]), logprob[b], alternatives, self.full[b]))
        return result


def _draw(pickers: Sequence[TokenPicker], logprobs: mx.array, positions: Sequence[int]) -> mx.array:
    """Each row's token [B] (uint32): one argmax for the greedy rows, each sampler for
    the others."""
    greedy = mx.argmax(logprobs, axis=-1).astype(mx.uint32)
    if all(p.greedy for p in pickers):
        return greedy
    return mx.concatenate(
        [
            greedy[b : b + 1]
            if p.greedy
            else p.draw(logprobs[b : b + 1], positions[b]).reshape(1).astype(mx.uint32)
            for b, p in enumerate(pickers)
        ]
    )


def _top(logprobs: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k most likely token ids [B, k] of logprobs [B, vocab], most likely first, and
    their logprobs [B, k] (float32); [B, 0] for k = 0."""
    rows, vocab = logprobs.shape
    k = min(k, vocab)
    if k == 0:
        return mx.zeros((rows, 0), dtype=mx.uint32), mx.zeros((rows, 0), dtype=mx.float32)
    ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    ids = mx.take_along_axis(ids, order, axis=-1)
    return ids.astype(mx.uint32), mx.take_along_axis(values, order, axis=-1).astype(mx.float32)


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
    mx.eval([step.arrays() for step in steps])  # every position at once
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
                f"session {session.session_id!r} samples with logits processors (penalties, "
                "logit_bias or a grammar), which see every token: each of its steps needs "
                "token_ids"
            )
