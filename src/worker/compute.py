"""One pipeline step on this worker's layers. Knows nothing of gRPC or sessions' ids.

Two ways to run a step of B sessions:
- `forward_rows`: each row through the layers with its own caches, rows stacked
  afterwards. Any lengths and offsets; a lone session runs exactly as in mlx-lm.
- `forward_batch`: one token per row through the layers at once, with batch
  caches whose rows sit at different offsets (continuous batching's decode step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from mlx_cluster.models.slicing import LayerSlice


def forward_rows(
    layer_slice: LayerSlice,
    hidden: mx.array,
    caches_per_row: Sequence[list[Any]],
    last_position_only: bool,
) -> mx.array:
    """Run hidden states [B, L, D] through the slice, extending each row's caches.

    Args:
        layer_slice: the loaded layers.
        hidden: the previous stage's output, one row per session.
        caches_per_row: caches_per_row[b] are row b's caches for these layers.
        last_position_only: return [B, 1, D] (all the LM head needs).

    Returns:
        The evaluated hidden states after the slice's last layer.
    """
    outputs = []
    for row, caches in enumerate(caches_per_row):
        h = layer_slice(hidden[row : row + 1], caches)
        outputs.append(h[:, -1:, :] if last_position_only else h)
    out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)
    mx.eval(out, [c.state for caches in caches_per_row for c in caches])
    return out


def forward_batch(
    layer_slice: LayerSlice, hidden: mx.array, batch_caches: list[Any], rows: Sequence[int]
) -> mx.array:
    """Run hidden states [B, 1, D] through the slice as one batch.

    Args:
        layer_slice: the loaded layers.
        hidden: one new position per session, in the order the caller sent them.
        batch_caches: the batch's caches, one per layer (mlx-lm batch caches).
        rows: rows[i] is the batch row of the caller's row i.

    Returns:
        The evaluated hidden states [B, 1, D], in the caller's order.
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
    mx.eval(out, [c.state for c in batch_caches])
    return out
