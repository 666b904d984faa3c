"""A worker's store of the model files a coordinator sent it (weights that travel).

`<root>/<model key>/` holds the files of the one slice this worker was last sent of that
model: a new slice replaces the old `model.safetensors`, so the disk holds only the layers
the worker serves. A file is written as `<name>.partial`, one verified chunk at a time,
beside `<name>.partial.json` (the file's expected size and sha256, and how many bytes are
verified and written): a transfer cut off anywhere resumes at those bytes, even after the
worker itself was killed mid-write. Once the last byte is in and the whole file's sha256
matches, it is renamed into place and recorded in `manifest.json`.

Plain file I/O; the worker's WeightService calls it off the event loop, one call at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_cluster.contract.errors import InvalidArgument
from mlx_cluster.models.slice_files import READ_BLOCK, SAFE_NAME, FileSpec

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PARTIAL = ".partial"


def store_root() -> Path:
    """`<MLX_CLUSTER_HOME or ~/.cache/mlx-cluster>/received`, beside the model cache."""
    from mlx_cluster.models.demo import model_cache_dir

    return model_cache_dir().parent / "received"


def received_model(ref: str, root: Path | None = None) -> Path | None:
    """The directory of model key `ref` in the store, if a slice of it was received."""
    if not SAFE_NAME.match(ref):
        return None
    path = (root or store_root()) / ref
    return path if (path / MANIFEST).is_file() and (path / "config.json").is_file() else None


@dataclass(frozen=True)
class Written:
    """What the store holds of a file after a chunk."""

    verified_bytes: int
    complete: bool
    refused: str = ""  # why the chunk was not written; "" = it was


def check_name(value: str, what: str) -> str:
    if not SAFE_NAME.match(value):
        raise InvalidArgument(
            f"{what} must be 1-128 letters, digits, '.', '_' or '-' (not first), got {value[:64]!r}"
        )
    return value


class WeightStore:
    """Received model files under `root` (default `store_root()`)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or store_root()
        self._lock = threading.Lock()  # one writer at a time, whichever call it serves

    def model_dir(self, key: str) -> Path:
        return self.root / check_name(key, "model key")

    def held(self, key: str, file: FileSpec) -> Written:
        """What the store holds of `file`: all of it, or the verified bytes of a partial."""
        check_name(file.name, "file name")
        with self._lock:
            directory = self.model_dir(key)
            if _complete(directory, file):
                return Written(file.size, complete=True)
            return Written(_partial(directory, file), complete=False)

    def write(self, key: str, file: FileSpec, offset: int, data: bytes, sha256: str) -> Written:
        """Write a chunk at `offset` if it is the next one and its digest matches."""
        check_name(file.name, "file name")
        with self._lock:
            directory = self.model_dir(key)
            if _complete(directory, file):
                return Written(file.size, complete=True)
            verified = _partial(directory, file)
            if offset != verified:
                return Written(verified, False, f"offset {offset}, expected {verified}")
            if hashlib.sha256(data).hexdigest() != sha256:
                log.warning("chunk at %d of %s failed its checksum: refused", offset, file.name)
                return Written(verified, False, f"chunk at {offset} failed its sha256 check")
            if verified + len(data) > file.size:
                return Written(verified, False, f"chunk ends past the file's {file.size} bytes")
            partial = directory / (file.name + PARTIAL)
            with partial.open("ab") as f:
                f.write(data)
            verified += len(data)
            _write_json(_sidecar(partial), {**asdict(file), "verified_bytes": verified})
            if verified < file.size:
                return Written(verified, complete=False)
            return self._finish(directory, file, partial)

    def _finish(self, directory: Path, file: FileSpec, partial: Path) -> Written:
        digest = hashlib.sha256()
        with partial.open("rb") as f:
            while block := f.read(READ_BLOCK):
                digest.update(block)
        if digest.hexdigest() != file.sha256:
            _remove(partial, _sidecar(partial))
            return Written(0, False, f"{file.name}'s sha256 does not match: starting it again")
        os.replace(partial, directory / file.name)
        manifest = _read_json(directory / MANIFEST)
        manifest[file.name] = asdict(file)
        _write_json(directory / MANIFEST, manifest)
        _remove(_sidecar(partial))
        log.info("received %s of %s (%d bytes)", file.name, directory.name, file.size)
        return Written(file.size, complete=True)


def _complete(directory: Path, file: FileSpec) -> bool:
    """Whether `file` is in place, as the manifest recorded it."""
    target = directory / file.name
    recorded = _read_json(directory / MANIFEST).get(file.name)
    return recorded == asdict(file) and target.is_file() and target.stat().st_size == file.size


def _partial(directory: Path, file: FileSpec) -> int:
    """The verified bytes of `file`'s partial, started empty if there is none of it."""
    partial = directory / (file.name + PARTIAL)
    state = _read_json(_sidecar(partial))
    if {k: state.get(k) for k in ("name", "size", "sha256")} != asdict(file):
        _remove(partial, _sidecar(partial))  # another file's, or none
        directory.mkdir(parents=True, exist_ok=True)
        partial.touch()
        _write_json(_sidecar(partial), {**asdict(file), "verified_bytes": 0})
        return 0
    verified = int(state["verified_bytes"])
    with partial.open("r+b") as f:  # drop bytes a kill left unrecorded
        f.truncate(verified)
    return verified


def _sidecar(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _read_json(path: Path) -> dict:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, value: dict) -> None:
    """Write atomically: a kill leaves the old contents or the new, never half."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value))
    os.replace(temporary, path)


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
