"""One pipeline step on this worker's stage. Knows nothing of gRPC or sessions' ids.

Two ways to run a step of B sessions:
- `forward_rows`: each row through the layers with its own caches, rows stacked
  afterwards. Any lengths and offsets; a lone session runs exactly as in mlx-lm.
- `forward_batch`: one token per row through the layers at once, with batch
  caches whose rows sit at different offsets (continuous batching's decode step).
The `check_*` functions refuse a step's malformed inputs before any of them runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import mlx.core as mx

from mlx_cluster.contract.errors import InvalidArgument
from mlx_cluster.contract.sampling import check_token_ids as check_in_vocabulary
from mlx_cluster.models.slicing import LayerSlice


def forward_rows(
    layer_slice: LayerSlice,
    hidden: mx.array,
    caches_per_row: Sequence[list[Any]],
    last_position_only: bool,
    evaluate: bool = True,
    verifying: bool = False,
) -> mx.array:
    """Run hidden states [B, L, D] through the slice, extending each row's caches.

    Args:
        layer_slice: the loaded layers.
        hidden: the previous stage's output, one row per session.
        caches_per_row: caches_per_row[b] are row b's caches for these layers.
        last_position_only: return [B, 1, D] (all the LM head needs).
        evaluate: evaluate the output (and the caches) before returning; False leaves
            that to the caller, who builds more on it (the head and the sampling).
        verifying: the step verifies drafts (see LayerSlice.__call__).

    Returns:
        The hidden states after the slice's last layer.
    """
    if len(caches_per_row) == 1:  # a lone session: no slicing or stacking
        out = layer_slice(hidden, caches_per_row[0], verifying)
        out = out[:, -1:, :] if last_position_only else out
    else:
        outputs = []
        for row, caches in enumerate(caches_per_row):
            h = layer_slice(hidden[row : row + 1], caches, verifying)
            outputs.append(h[:, -1:, :] if last_position_only else h)
        out = mx.concatenate(outputs, axis=0)
    if evaluate:
        mx.eval(out, [c.state for caches in caches_per_row for c in caches])
    return out


def forward_batch(
    layer_slice: LayerSlice,
    hidden: mx.array,
    batch_caches: list[Any],
    rows: Sequence[int],
    evaluate: bool = True,
) -> mx.array:
    """Run hidden states [B, 1, D] through the slice as one batch.

    Args:
        layer_slice: the loaded layers.
        hidden: one new position per session, in the order the caller sent them.
        batch_caches: the batch's caches, one per layer (mlx-lm batch caches).
        rows: rows[i] is the batch row of the caller's row i.
        evaluate: as for `forward_rows`.

    Returns:
        The hidden states [B, 1, D], in the caller's order.
    """
    in_order = list(rows) == list(range(len(rows)))
    if not in_order:
        to_batch = [0] * len(rows)
        for caller_row, batch_row in enumerate(rows):
            to_batch[batch_row] = caller_row
        hidden = hidden[mx.array(to_batch)]
    out = layer_slice(hidden, batch_caches)
    if not in_order:
        out = out[mx.array(list(rows))]
    if evaluate:
        mx.eval(out, [c.state for c in batch_caches])
    return out


# --- a step's inputs -------------------------------------------------------------


def check_rows(session_ids: list[str], offsets: list[int], max_batch: int) -> None:
    if not session_ids:
        raise InvalidArgument("a step needs at least one session id")
    if len(session_ids) > max_batch:
        raise InvalidArgument(f"{len(session_ids)} sessions in one step, at most {max_batch}")
    if len(set(session_ids)) != len(session_ids):
        raise InvalidArgument("a step names the same session twice")
    if len(offsets) != len(session_ids):
        raise InvalidArgument(f"{len(session_ids)} session ids but {len(offsets)} offsets")


def check_hidden(hidden: mx.array, rows: int, hidden_size: int, dtype: mx.Dtype) -> None:
    if hidden.ndim != 3 or hidden.shape[0] != rows or hidden.shape[1] < 1:
        raise InvalidArgument(
            f"hidden states must be [B, L, D] = {(rows, 'L>=1', hidden_size)}, got {hidden.shape}"
        )
    if hidden.shape[2] != hidden_size:
        raise InvalidArgument(f"hidden size must be {hidden_size}, got {hidden.shape[2]}")
    if hidden.dtype != dtype:
        raise InvalidArgument(f"hidden states must be {dtype}, got {hidden.dtype}")


def check_token_ids(
    token_ids: mx.array, rows: int, length: int | None, vocab_size: int | None
) -> None:
    """token_ids must be [B, L] uint32 (L that of the step's hidden states if given), and
    inside the vocabulary if its size is known here: MLX does not bounds-check gathers."""
    expected = (rows, "L>=1" if length is None else length)
    if (
        token_ids.ndim != 2
        or token_ids.shape[0] != rows
        or token_ids.shape[1] < 1
        or (length is not None and token_ids.shape[1] != length)
    ):
        raise InvalidArgument(f"token_ids must be [B, L] = {expected}, got {token_ids.shape}")
    if token_ids.dtype != mx.uint32:
        raise InvalidArgument(f"token_ids must be uint32, got {token_ids.dtype}")
    if vocab_size is not None:  # read from the host: the ids arrived as bytes, no kernel
        check_in_vocabulary("token_ids", cast(list[int], token_ids.flatten().tolist()), vocab_size)
