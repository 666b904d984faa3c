"""Tensors through shared memory, between processes on one host.

A worker that relays hidden states to a worker on its own host writes them into a
segment of its own (`SharedArena`) and sends only where they lie (`Tensor.shared`);
the next worker copies them out (`SharedViews.decode`) before it computes, so a
segment is free again once that step's answer is back. A prompt chunk of an 8B
model (512 positions, 4 MiB) then costs two copies at memory speed instead of a
gRPC message's serialization, socket and parsing.

Whether two workers share memory is tested, not assumed: each worker keeps a tiny
probe segment (`Probe`) and reports its name in Info; a worker relays through
shared memory only to a next stage whose probe it can open (same host, same
/dev/shm). Segments are POSIX shared memory named SEGMENT_PREFIX-...; a receiver
opens no other name. The bytes are the wire format's (see wire.py): row-major,
bfloat16 as its raw 16 bits.
"""

from __future__ import annotations

import collections
import contextlib
import math
import re
import secrets
import threading
from multiprocessing import resource_tracker, shared_memory

import mlx.core as mx

from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.tensor.wire import DEFAULT_MAX_ELEMENTS, from_bytes, to_bytes

SEGMENT_PREFIX = "mlxc"
# Tensors smaller than this go inline in the message: a decode step's few kilobytes
# cost less in a message than a segment's bookkeeping.
MIN_SHARED_BYTES = 1 << 20
_ROUND = 1 << 20  # segments grow in whole MiB, so the next chunk's usually fits
_NAME = re.compile(rf"^{SEGMENT_PREFIX}-[0-9a-f]{{16}}$")
OPEN_SEGMENTS = 8  # segments a receiver keeps open: a few streams' few in flight


_CREATED: set[str] = set()  # segments this process made (its resource tracker's own)


def _create(size: int) -> shared_memory.SharedMemory:
    name = f"{SEGMENT_PREFIX}-{secrets.token_hex(8)}"  # 21 characters: macOS allows 31
    segment = shared_memory.SharedMemory(name=name, create=True, size=size)
    _CREATED.add(name)
    return segment


def _attach(name: str) -> shared_memory.SharedMemory:
    """Open a segment without adopting it: Python < 3.13 registers an opened segment with
    this process's resource tracker, which would unlink another process's at exit."""
    segment = shared_memory.SharedMemory(name=name)
    if name not in _CREATED:
        resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
    return segment


def can_open(name: str) -> bool:
    """Whether this process can open the segment `name` (a probe): the two share memory."""
    if not _NAME.match(name):
        return False
    try:
        _attach(name).close()
    except (FileNotFoundError, PermissionError, OSError):
        return False
    return True


class Probe:
    """A worker's one-byte segment, kept open while it runs, that peers try to open."""

    def __init__(self) -> None:
        self._segment = _create(1)
        self.name = self._segment.name.lstrip("/")

    def close(self) -> None:
        """Remove the probe (again: nothing)."""
        _destroy(self._segment)


class SharedArena:
    """A sender's segments: one per tensor in flight, reused once it has been read.

    `put` runs on the thread that encodes (the compute thread), `release` and
    `close` on the event loop: a lock keeps the free list whole.
    """

    def __init__(self, min_bytes: int = MIN_SHARED_BYTES) -> None:
        self.min_bytes = min_bytes
        self._free: list[shared_memory.SharedMemory] = []
        self._busy: dict[str, shared_memory.SharedMemory] = {}
        self._lock = threading.Lock()
        self._closed = False

    def put(self, array: mx.array, out: pb.Tensor) -> str | None:
        """Write `array` into a free segment and say where in `out`; returns the
        segment's name, or None (nothing written) for a tensor to send inline."""
        dtype, shape, data = to_bytes(array)
        if data.nbytes < self.min_bytes:
            return None
        segment = self._take(data.nbytes)
        _buffer(segment)[: data.nbytes] = data
        out.dtype = dtype
        out.shape[:] = shape
        out.shared.segment = segment.name.lstrip("/")
        out.shared.nbytes = data.nbytes
        return out.shared.segment

    def _take(self, nbytes: int) -> shared_memory.SharedMemory:
        with self._lock:
            if self._closed:
                raise RuntimeError("the shared-memory arena is closed")
            fits = [s for s in self._free if s.size >= nbytes]
            segment = fits[0] if fits else None
            if segment is not None:
                self._free.remove(segment)
            elif self._free:  # too small: make room for a larger one
                _destroy(self._free.pop(0))
        if segment is None:
            size = math.ceil(nbytes / _ROUND) * _ROUND
            segment = _create(size)
        with self._lock:
            self._busy[segment.name.lstrip("/")] = segment
        return segment

    def release(self, name: str) -> None:
        """The tensor in segment `name` has been read: the segment takes the next."""
        with self._lock:
            segment = self._busy.pop(name, None)
            if segment is not None:
                self._free.append(segment)

    def close(self) -> None:
        """Unlink every segment (a reader that has one open keeps its mapping)."""
        with self._lock:
            self._closed = True
            segments = [*self._free, *self._busy.values()]
            self._free, self._busy = [], {}
        for segment in segments:
            _destroy(segment)

    @property
    def segments(self) -> int:
        with self._lock:
            return len(self._free) + len(self._busy)


def _buffer(segment: shared_memory.SharedMemory) -> memoryview:
    buffer = segment.buf
    assert buffer is not None, "a closed segment"
    return buffer


def _destroy(segment: shared_memory.SharedMemory) -> None:
    segment.close()
    with contextlib.suppress(FileNotFoundError):
        segment.unlink()
    _CREATED.discard(segment.name.lstrip("/"))


class SharedViews:
    """A receiver's open segments (the last OPEN_SEGMENTS used), and tensors copied out."""

    def __init__(self, capacity: int = OPEN_SEGMENTS) -> None:
        self.capacity = capacity
        self._open: collections.OrderedDict[str, shared_memory.SharedMemory] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def decode(self, msg: pb.Tensor, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> mx.array:
        """A copy of the tensor `msg.shared` points at.

        Raises:
            ValueError: a segment name not ours, one that cannot be opened, or bytes
                beyond its end (and what from_bytes checks).
        """
        name, nbytes = msg.shared.segment, msg.shared.nbytes
        if not _NAME.match(name):
            raise ValueError(f"shared tensor: {name[:40]!r} is not a segment name")
        with self._lock:
            segment = self._segment(name)
            if nbytes > segment.size:
                raise ValueError(
                    f"shared tensor: {nbytes} bytes in segment {name} of {segment.size}"
                )
            return from_bytes(
                msg.dtype, msg.shape, _buffer(segment)[:nbytes], max_elements=max_elements
            )

    def _segment(self, name: str) -> shared_memory.SharedMemory:
        segment = self._open.get(name)
        if segment is not None:
            self._open.move_to_end(name)
            return segment
        try:
            segment = _attach(name)
        except OSError as exc:
            raise ValueError(f"shared tensor: cannot open segment {name}: {exc}") from exc
        self._open[name] = segment
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)[1].close()
        return segment

    def close(self) -> None:
        with self._lock:
            for segment in self._open.values():
                segment.close()
            self._open.clear()
