"""Regenerate the gRPC stubs in src/contract/proto/ from protos/.

Usage: python scripts/generate_protos.py [OUT_DIR]

The stubs are committed; tests/test_protos.py fails when they drift from
the .proto files, so run this after every change to protos/.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos" / "mlx_cluster" / "v1"
DEFAULT_OUT = ROOT / "src" / "contract" / "proto"
PACKAGE = "mlx_cluster.contract.proto"


def generate(out_dir: Path) -> list[Path]:
    """Generate *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    written: list[Path] = []
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_DIR}",
                f"-I{include}",
                f"--python_out={out_dir}",
                f"--pyi_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                str(proto),
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto} with exit code {code}")
        stem = proto.stem
        grpc_file = out_dir / f"{stem}_pb2_grpc.py"
        # protoc writes a top-level import; make it relative to our package.
        text = grpc_file.read_text()
        text = re.sub(
            rf"^import {stem}_pb2 as", f"from {PACKAGE} import {stem}_pb2 as", text, flags=re.M
        )
        grpc_file.write_text(text)
        written += [out_dir / f"{stem}_pb2.py", out_dir / f"{stem}_pb2.pyi", grpc_file]
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(target):
        print(path)
