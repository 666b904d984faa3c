"""`mlx-cluster models`: list and clear cached models, import GGUF files, install the demo."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="manage local models")
    msub = p.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="cached models: size, architecture, layers, quantization")
    c = msub.add_parser("clear", help="delete cached models")
    c.add_argument("name", nargs="?", help="a model name or id; all models if omitted")
    c.add_argument("--yes", action="store_true", help="do not ask before deleting everything")
    g = msub.add_parser("import-gguf", help="convert a GGUF file into an MLX model directory")
    g.add_argument("file", type=Path)
    g.add_argument("out_dir", type=Path)
    g.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default=None,
        help="type of float tensors (scales included); default: as in the file",
    )
    g.add_argument("--dequantize", action="store_true", help="expand quantized weights")
    msub.add_parser("demo", help="install and import the bundled demo model")


@dataclass
class CachedModel:
    name: str
    path: Path
    size_bytes: int
    architecture: str
    layers: int | None
    quantization: str


def describe(name: str, path: Path) -> CachedModel:
    """What a model directory holds, from its config.json and file sizes."""
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    quant = config.get("quantization") or config.get("quantization_config")
    quantization = (
        f"{quant.get('bits')}-bit, group {quant.get('group_size')}"
        if isinstance(quant, dict)
        else str(config.get("torch_dtype", "-"))
    )
    return CachedModel(
        name,
        path,
        size,
        str(config.get("model_type", "?")),
        config.get("num_hidden_layers"),
        quantization,
    )


def cached_models() -> list[CachedModel]:
    """Models imported into our cache, then models in the Hugging Face cache."""
    from mlx_cluster.models.sources import local_models

    return [describe(m.name, m.path) for m in local_models()]


def _list() -> int:
    rows = [
        (
            m.name,
            f"{m.size_bytes / 1e9:.2f} GB",
            m.architecture,
            str(m.layers or "?"),
            m.quantization,
        )
        for m in cached_models()
    ]
    if not rows:
        print("no cached models (try: mlx-cluster models demo)")
        return 0
    header = ("model", "size", "architecture", "layers", "quantization")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _clear(name: str | None, yes: bool) -> int:
    models = [m for m in cached_models() if name is None or m.name == name]
    if not models:
        print(f"no cached model named {name!r}", file=sys.stderr)
        return 1
    if name is None and not yes:
        print(f"this deletes {len(models)} models; run again with --yes", file=sys.stderr)
        return 1
    for m in models:
        target = m.path
        if "/" in m.name:  # a Hugging Face snapshot: delete the whole repo folder
            target = m.path.parents[1]
        shutil.rmtree(target)
        print(f"deleted {m.name} ({m.size_bytes / 1e9:.2f} GB)")
    return 0


def run(args: argparse.Namespace) -> int:
    from mlx_cluster.models.demo import ensure_demo_model
    from mlx_cluster.models.gguf_import import import_gguf

    command = args.models_command
    if command == "list":
        return _list()
    if command == "clear":
        return _clear(args.name, args.yes)
    if command == "import-gguf":
        try:
            out = import_gguf(args.file, args.out_dir, progress=print, dtype=args.dtype,
                              dequantize=args.dequantize)  # fmt: skip
        except (ValueError, OSError) as exc:
            print(f"mlx-cluster models import-gguf: {exc}", file=sys.stderr)
            return 2
        print(f"imported into {out}")
        return 0
    print(f"demo model ready at {ensure_demo_model(progress=print)}")
    return 0
