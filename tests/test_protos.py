"""The committed gRPC stubs are exactly what protoc makes of protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_match_protos(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "generate_protos", ROOT / "scripts/generate_protos.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = module.generate(tmp_path)
    committed = ROOT / "src/contract/proto"
    assert fresh
    for path in fresh:
        assert (committed / path.name).read_text() == path.read_text(), (
            f"{path.name} drifted from protos/: run python scripts/generate_protos.py"
        )
