"""One pipeline step on this worker's layers. Knows nothing of gRPC or sessions' ids.

Rows of a batch may sit at different cache offsets, so each row runs through
the layers with its own caches; rows are stacked again afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from models.slicing import LayerSlice


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
