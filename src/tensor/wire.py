"""Exact conversion between MLX arrays and the wire `Tensor` message.

Invariant: a tensor arrives bit for bit as it was sent, in the dtype it was
sent in. Nothing is upcast: bfloat16 travels as its raw 16 bits (viewed as
uint16), 2 bytes a value. The payload is the row-major (C order) bytes of the
array's logical content in the host's byte order, which is little-endian on
every platform MLX runs on. Encoding reads the array's memory through the
buffer protocol and copies it once, into the message; decoding checks the
declared dtype, shape and byte count before it allocates anything.

A row-contiguous array (what layers return) is read through its own buffer,
bfloat16 included: viewing it as uint16 first would be one more MLX operation to
evaluate, which costs more than the copy for a decode step's few kilobytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from mlx_cluster.contract.proto import layer_service_pb2 as pb

# Every dtype that may cross the wire, by its MLX name.
DTYPES: dict[str, mx.Dtype] = {
    "bool": mx.bool_,
    "uint8": mx.uint8,
    "uint16": mx.uint16,
    "uint32": mx.uint32,
    "uint64": mx.uint64,
    "int8": mx.int8,
    "int16": mx.int16,
    "int32": mx.int32,
    "int64": mx.int64,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "float32": mx.float32,
    "float64": mx.float64,
    "complex64": mx.complex64,
}

# numpy has no bfloat16, so its bits are carried as uint16.
_NUMPY: dict[str, np.dtype] = {
    name: np.dtype("uint16" if name == "bfloat16" else name) for name in DTYPES
}
_NAMES: dict[mx.Dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

MAX_NDIM = 8  # most dimensions a wire tensor may declare
MAX_DIM = 2**31 - 1  # MLX stores each dimension as an int32
DEFAULT_MAX_ELEMENTS = 2**34  # element count beyond which a shape is rejected as absurd


# --- encode -----------------------------------------------------------------


def dtype_name(dtype: mx.Dtype) -> str:
    """Wire name of an MLX dtype, e.g. `mx.bfloat16` -> "bfloat16"."""
    if dtype not in _NAMES:
        raise ValueError(f"unsupported dtype {dtype}; expected one of: {', '.join(DTYPES)}")
    return _NAMES[dtype]


def _host_view(array: mx.array) -> np.ndarray:
    """numpy view of `array`'s memory (zero-copy), strides and all."""
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.asarray(array)


def _contiguous_bytes(array: mx.array) -> memoryview | None:
    """Flat uint8 view of `array`'s memory (zero-copy) if it is row-major; else None.

    Evaluates the array, as any read of its data does.
    """
    # bfloat16 too: MLX exports it with format "bfloat16" (its stubs omit __buffer__).
    buffer = memoryview(array)  # type: ignore[arg-type]
    if not buffer.c_contiguous or buffer.nbytes == 0:  # cast() refuses empty shapes
        return None
    return buffer.cast("B")


def to_bytes(array: mx.array) -> tuple[str, tuple[int, ...], memoryview]:
    """Split an array into its wire parts without copying when it is contiguous.

    Args:
        array: Any MLX array; transposed, sliced or broadcast arrays are
            compacted to their logical row-major content (one copy).

    Returns:
        `(dtype name, shape, row-major bytes)`. The memoryview keeps the array
        alive and is valid as long as the array is not modified.
    """
    name = dtype_name(array.dtype)
    flat = _contiguous_bytes(array)
    if flat is None:
        host = np.ascontiguousarray(_host_view(array))
        flat = host.reshape(-1).view(np.uint8).data
    return name, tuple(array.shape), flat


def encode(array: mx.array, out: pb.Tensor | None = None) -> pb.Tensor:
    """Write an array into a `Tensor` message.

    Args:
        array: Any MLX array, contiguous or not.
        out: Message to fill in place (e.g. a field of a larger request);
            a new one is made when omitted.

    Returns:
        The filled message; `data` is the only copy of the array's bytes.
    """
    msg = pb.Tensor() if out is None else out
    msg.dtype = dtype_name(array.dtype)
    msg.shape[:] = array.shape
    flat = _contiguous_bytes(array)
    # One copy either way: numpy's tobytes() writes C order straight from any strides.
    msg.data = flat.tobytes() if flat is not None else _host_view(array).tobytes()
    return msg


# --- decode -----------------------------------------------------------------


def _check(
    dtype: str, shape: tuple[int, ...], n_bytes: int, max_elements: int
) -> tuple[np.dtype, int]:
    """Validate wire parts; return the numpy carrier dtype and element count."""
    if dtype not in _NUMPY:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of: {', '.join(DTYPES)}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"shape {shape} has {len(shape)} dimensions, expected at most {MAX_NDIM}")
    if any(d < 0 or d > MAX_DIM for d in shape):
        raise ValueError(f"shape {shape} has a dimension outside the expected range [0, {MAX_DIM}]")
    count = math.prod(shape)
    if count > max_elements:
        raise ValueError(f"shape {shape} has {count} elements, expected at most {max_elements}")
    carrier = _NUMPY[dtype]
    expected = count * carrier.itemsize
    if n_bytes != expected:
        raise ValueError(
            f"expected {expected} bytes for shape {shape} dtype {dtype}, received {n_bytes}"
        )
    return carrier, count


def from_bytes(
    dtype: str,
    shape: Sequence[int],
    data: bytes | bytearray | memoryview,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> mx.array:
    """Rebuild an array from its wire parts.

    Args:
        dtype: MLX dtype name, one of `DTYPES`.
        shape: Dimensions; `()` for a scalar, a 0 for an empty array.
        data: Row-major bytes, exactly `prod(shape) * itemsize` of them.
        max_elements: Largest element count accepted.

    Returns:
        A new MLX array of `dtype` and `shape` holding a copy of `data`.

    Raises:
        ValueError: unknown dtype, bad shape, or byte count not matching both.
    """
    dims = tuple(int(d) for d in shape)
    carrier, count = _check(dtype, dims, memoryview(data).nbytes, max_elements)
    host = np.frombuffer(data, dtype=carrier, count=count).reshape(dims)
    if dtype == "bfloat16":
        return mx.array(host).view(mx.bfloat16)
    if dtype == "bool":
        # Any nonzero byte is True; store it canonically as 1.
        return mx.array(host.view(np.uint8) != 0)
    # dtype= keeps float64 (mx.array would narrow it to float32).
    return mx.array(host, dtype=DTYPES[dtype])


def decode(msg: pb.Tensor, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> mx.array:
    """Rebuild an array from a `Tensor` message; see `from_bytes`.

    Args:
        msg: The received message.
        max_elements: Largest element count accepted.

    Returns:
        A new MLX array of the message's dtype and shape.

    Raises:
        ValueError: unknown dtype, bad shape, or byte count not matching both.
    """
    return from_bytes(msg.dtype, msg.shape, msg.data, max_elements=max_elements)
