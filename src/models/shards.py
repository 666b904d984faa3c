"""Which safetensors shards hold which layers, and views of a model with only some of them.

A sharded checkpoint lists every tensor's shard in model.safetensors.index.json.
A worker needs the shards holding its layers; the coordinator those holding the
embedding, final norm and head. `shard_view` gives mlx-lm a directory that
holds only those shards (as symbolic links), so no other shard is ever opened.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

INDEX_FILE = "model.safetensors.index.json"
LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def weight_map(model: Path) -> dict[str, str] | None:
    """tensor name -> shard file name, or None for an unsharded model."""
    index = model / INDEX_FILE
    if not index.is_file():
        return None
    return dict(json.loads(index.read_text())["weight_map"])


def shards_for(
    weights: dict[str, str], layers: range | None = None, edges: bool = False
) -> set[str]:
    """The shard files holding tensors of `layers` and, with edges=True, everything else."""
    needed = set()
    for name, shard in weights.items():
        match = LAYER_KEY.search(name)
        if match is None:
            if edges:
                needed.add(shard)
        elif layers is not None and int(match.group(1)) in layers:
            needed.add(shard)
    return needed


def check_weights_present(view: Path, layers: range | None, edges: bool, model: Path) -> None:
    """Raise unless the weight files in `view` hold every layer asked for (and the edges).

    mlx-lm's non-strict loading would otherwise leave missing weights at their
    random initial values and serve garbage.
    """
    from mlx_cluster.models.inspect import read_safetensors_header

    names = [n for f in sorted(view.glob("*.safetensors")) for n in read_safetensors_header(f)]
    found = {int(m.group(1)) for n in names if (m := LAYER_KEY.search(n))}
    missing = sorted(set(layers or ()) - found)
    if missing:
        raise ValueError(f"the weights of {model} hold no tensors for layers {missing}")
    if edges and not any(LAYER_KEY.search(n) is None for n in names):
        raise ValueError(f"the weights of {model} hold no embedding, norm or head")


@contextlib.contextmanager
def shard_view(model: Path, layers: range | None = None, edges: bool = False) -> Iterator[Path]:
    """A directory like `model` whose only weight files are the shards needed.

    Unsharded models are given as they are. The view lives until the context
    ends; evaluate lazily loaded weights before leaving it.
    """
    weights = weight_map(model)
    if weights is None:
        yield model
        return
    needed = shards_for(weights, layers, edges)
    view = Path(tempfile.mkdtemp(prefix="mlx-cluster-view-"))
    try:
        for item in model.iterdir():
            if item.suffix != ".safetensors" or item.name in needed:
                (view / item.name).symlink_to(item.resolve())
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)
