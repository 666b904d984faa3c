"""The files a worker needs to run one stage of a model, built from the coordinator's copy.

A stage's weights travel as one safetensors file, `model.safetensors`, holding only the
tensors of its layers, plus the embedding for the first stage and the final norm and LM
head for the last (`_in_stage`), byte for byte as in the source shards. The metadata
files (config, tokenizer, chat template) travel as they are. No MLX here: a tensor is a
byte range of a source file, and the slice file is its new header followed by those
ranges, so it is never written on the sender's disk.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from mlx_cluster.models.inspect import edge_part, read_safetensors_header, weight_files
from mlx_cluster.models.shards import INDEX_FILE, LAYER_KEY
from mlx_cluster.models.sources import METADATA_PATTERNS

SLICE_FILE = "model.safetensors"  # a name mlx-lm's loader globs for
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
READ_BLOCK = 8 * 1024 * 1024  # bytes read at a time while hashing


@dataclass(frozen=True)
class FileSpec:
    """A file as the sender has it: what the receiver checks the bytes it got against."""

    name: str  # a plain file name (SAFE_NAME)
    size: int  # bytes
    sha256: str  # hex digest of the whole file


@dataclass(frozen=True)
class _Range:
    """Bytes [offset, offset + length) of a source file."""

    path: Path
    offset: int
    length: int


@dataclass
class FileSource:
    """A file to send, read from its parts: bytes held in memory and ranges of source files."""

    name: str
    parts: list[bytes | _Range]
    size: int = field(init=False)
    _digest: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.size = sum(len(p) if isinstance(p, bytes) else p.length for p in self.parts)

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset + size) of the file (fewer at its end)."""
        out, start = bytearray(), 0
        for part in self.parts:
            length = len(part) if isinstance(part, bytes) else part.length
            lo, hi = max(offset, start), min(offset + size, start + length)
            if lo < hi:
                if isinstance(part, bytes):
                    out += part[lo - start : hi - start]
                else:
                    with part.path.open("rb") as f:
                        f.seek(part.offset + lo - start)
                        out += f.read(hi - lo)
            start += length
        return bytes(out)

    def spec(self, digests: DigestCache | None = None) -> FileSpec:
        """Name, size and sha256: from `digests` if it knows this file as it is now, else
        hashed (the whole file is read) and kept there."""
        if self._digest is None:
            self._digest = digests.get(self) if digests is not None else None
        if self._digest is None:
            digest = hashlib.sha256()
            for offset in range(0, self.size, READ_BLOCK):
                digest.update(self.read(offset, READ_BLOCK))
            self._digest = digest.hexdigest()
            if digests is not None:
                digests.put(self, self._digest)
        return FileSpec(self.name, self.size, self._digest)

    def signature(self) -> str:
        """What the file is built from, as it is now: its name, the bytes held, and each
        source file's path, size and modification time. Equal signatures, equal bytes."""
        state = hashlib.sha256(self.name.encode())
        for part in self.parts:
            if isinstance(part, bytes):
                state.update(part)
            else:
                stat = part.path.stat()
                where = (str(part.path.resolve()), part.offset, part.length)
                state.update(repr((*where, stat.st_size, stat.st_mtime_ns)).encode())
        return state.hexdigest()


class DigestCache:
    """The sha256 of files built before, by signature, in a JSON file: a coordinator that
    starts again does not read the whole model to hash the slices it sends."""

    def __init__(self, path: Path, keep: int = 1024) -> None:
        self.path = path
        self.keep = keep  # the most recent this many digests are kept
        self._lock = threading.Lock()
        try:
            self._digests: dict[str, str] = dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            self._digests = {}

    def get(self, source: FileSource) -> str | None:
        return self._digests.get(source.signature())

    def put(self, source: FileSource, digest: str) -> None:
        signature = source.signature()
        with self._lock:  # stages' files are hashed in threads of their own
            self._digests[signature] = digest
            self._digests = dict(list(self._digests.items())[-self.keep :])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(json.dumps(self._digests))
            temporary.replace(self.path)


def _tensors(path: Path) -> tuple[int, dict[str, dict]]:
    """Where a safetensors file's data starts, and its tensor table."""
    with path.open("rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
    return 8 + header_length, read_safetensors_header(path)


def _in_stage(name: str, layers: range, embedding: bool, head: bool) -> bool:
    """Whether a stage loads tensor `name`. The last stage keeps every tensor outside the
    layers (a tied head is the embedding; the embedding also gives the hidden states'
    dtype), the first all but the final norm and LM head."""
    match = LAYER_KEY.search(name)
    if match is not None:
        return int(match.group(1)) in layers
    return head or (embedding and edge_part(name) not in ("norm", "lm_head"))


def slice_source(model: Path, layers: range, embedding: bool, head: bool) -> FileSource:
    """`model.safetensors` holding the tensors a stage of `layers` loads (with the edges
    asked for)."""
    header: dict[str, dict] = {}
    ranges: list[bytes | _Range] = []
    offset = 0
    for path in weight_files(model):
        data_start, table = _tensors(path)
        for name in sorted(n for n in table if _in_stage(n, layers, embedding, head)):
            entry = table[name]
            begin, end = entry["data_offsets"]
            header[name] = {
                "dtype": entry["dtype"],
                "shape": entry["shape"],
                "data_offsets": [offset, offset + end - begin],
            }
            ranges.append(_Range(path, data_start + begin, end - begin))
            offset += end - begin
    if not header:
        raise ValueError(f"the weights of {model} hold no tensors for layers {layers}")
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return FileSource(SLICE_FILE, [struct.pack("<Q", len(raw)) + raw, *ranges])


def metadata_sources(model: Path) -> list[FileSource]:
    """The model's metadata files, whole (not the shard index: the slice is one file)."""
    files = sorted(
        p
        for p in model.iterdir()
        if p.is_file()
        and p.name != INDEX_FILE
        and SAFE_NAME.match(p.name)
        and any(fnmatch(p.name, pattern) for pattern in METADATA_PATTERNS)
    )
    return [FileSource(p.name, [_Range(p, 0, p.stat().st_size)]) for p in files]


def stage_sources(model: Path, layers: range, embedding: bool, head: bool) -> list[FileSource]:
    """Every file a worker needs to load `layers` of `model`, with the embedding (the
    first stage) and/or the final norm and LM head (the last)."""
    return [*metadata_sources(model), slice_source(model, layers, embedding, head)]


def model_key(model: Path) -> str:
    """The model's name in workers' caches: its directory name and a digest of its config
    and tensor tables (not its data: the files' own digests tell copies apart)."""
    digest = hashlib.sha256((model / "config.json").read_bytes())
    for path in weight_files(model):
        data_start, _ = _tensors(path)
        with path.open("rb") as f:
            digest.update(f.read(data_start))
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", model.resolve().name).lstrip("._-")[:100] or "model"
    return f"{stem}-{digest.hexdigest()[:12]}"
