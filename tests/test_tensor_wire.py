"""Exactness and validation of the MLX array <-> wire `Tensor` conversion."""

from __future__ import annotations

import math
import re

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.tensor import DTYPES, MAX_NDIM, decode, encode, from_bytes, to_bytes

NAMES = sorted(DTYPES)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


def raw(array: mx.array) -> bytes:
    """The array's row-major bytes, read through MLX views (not the code under test)."""
    return bytes(np.asarray(mx.contiguous(array).reshape(-1).view(mx.uint8)))


def from_raw(data: bytes, name: str, shape: tuple[int, ...]) -> mx.array:
    """An MLX array holding exactly `data`, built by viewing uint8 bytes as `name`."""
    return mx.array(np.frombuffer(data, dtype=np.uint8)).view(DTYPES[name]).reshape(shape)


@st.composite
def arrays(draw: st.DrawFn) -> tuple[str, mx.array, bytes]:
    """Random dtype, shape and bit pattern (NaNs, infs and denormals included)."""
    name = draw(st.sampled_from(NAMES))
    shape = draw(shapes)
    n_bytes = math.prod(shape) * DTYPES[name].size
    data = draw(st.binary(min_size=n_bytes, max_size=n_bytes))
    if name == "bool":
        data = bytes(b & 1 for b in data)  # MLX bools are canonical 0/1 bytes
    return name, from_raw(data, name, shape), data


# --- exact round trip ---------------------------------------------------------


def test_dtypes_cover_every_mlx_dtype() -> None:
    in_mlx = {v for v in vars(mx).values() if isinstance(v, mx.Dtype)}
    assert set(DTYPES.values()) == in_mlx


@settings(max_examples=200, deadline=None)
@given(arrays())
def test_round_trip_is_bit_exact(case: tuple[str, mx.array, bytes]) -> None:
    name, x, data = case
    msg = encode(x)
    assert (msg.dtype, tuple(msg.shape), msg.data) == (name, x.shape, data)
    assert to_bytes(x) == (name, x.shape, data)

    y = decode(pb.Tensor.FromString(msg.SerializeToString()))
    assert (y.dtype, y.shape) == (x.dtype, x.shape)
    assert raw(y) == data


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2)])
def test_scalars_and_empty_arrays_round_trip(name: str, shape: tuple[int, ...]) -> None:
    x = mx.ones(shape, dtype=DTYPES[name])
    msg = encode(x)
    assert len(msg.data) == x.nbytes
    y = decode(msg)
    assert (y.dtype, y.shape) == (x.dtype, x.shape)
    assert mx.array_equal(x, y)


def test_encode_fills_given_message() -> None:
    out = pb.Tensor(dtype="int8", shape=[9, 9], data=b"stale")
    assert encode(mx.arange(3, dtype=mx.int32), out=out) is out
    assert (out.dtype, list(out.shape), len(out.data)) == ("int32", [3], 12)


def test_to_bytes_of_contiguous_array_does_not_copy() -> None:
    x = mx.arange(8, dtype=mx.float32)
    payload = np.frombuffer(to_bytes(x)[2], dtype=np.uint8)
    assert np.shares_memory(payload, np.asarray(x))


# --- non-contiguous inputs ----------------------------------------------------


def _views(a: mx.array) -> dict[str, mx.array]:
    return {
        "transposed": a.T,
        "every_other_row": a[::2],
        "columns_from_1": a[:, 1:],
        "broadcast": mx.broadcast_to(a[1:2], (5, 4)),
        "transposed_strided": a.T[1:, ::2],
        "reversed": a[::-1, ::-1],
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("view", list(_views(mx.zeros((5, 4)))))
def test_non_contiguous_arrays_send_logical_values(name: str, view: str) -> None:
    a = (mx.arange(20) % 7).reshape(5, 4).astype(DTYPES[name])
    x = _views(a)[view]
    expected = raw(x)

    msg = encode(x)
    assert (tuple(msg.shape), msg.data) == (x.shape, expected)
    assert bytes(to_bytes(x)[2]) == expected
    y = decode(msg)
    assert (y.dtype, y.shape) == (x.dtype, x.shape)
    assert mx.array_equal(x, y)


# --- bfloat16 -----------------------------------------------------------------


def test_bfloat16_travels_as_two_raw_bytes() -> None:
    x = mx.random.normal((3, 7), key=mx.random.key(0)).astype(mx.bfloat16)
    msg = encode(x)
    assert msg.dtype == "bfloat16"
    assert len(msg.data) == x.size * 2
    bits = np.frombuffer(msg.data, dtype="<u2").reshape(x.shape)
    np.testing.assert_array_equal(bits, np.asarray(x.view(mx.uint16)))
    assert mx.array_equal(decode(msg).view(mx.uint16), x.view(mx.uint16))


# --- validation ---------------------------------------------------------------


def test_unknown_dtype_names_it_and_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"unsupported dtype 'float8'.*bfloat16.*complex64"):
        from_bytes("float8", (2,), b"\0\0")


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, -1), r"shape \(2, -1\) has a dimension outside the expected range \[0, 2147483647\]"),
        ((2**31, 0), r"shape \(2147483648, 0\) has a dimension outside the expected range"),
        ((1,) * 9, rf"shape \(1(, 1){{8}}\) has 9 dimensions, expected at most {MAX_NDIM}"),
        (
            (2**20, 2**20),
            r"shape \(1048576, 1048576\) has 1099511627776 elements, "
            r"expected at most 1000",
        ),
    ],
)
def test_bad_shape_is_rejected_before_allocating(shape: tuple[int, ...], message: str) -> None:
    msg = pb.Tensor(dtype="float32", shape=shape, data=b"")
    with pytest.raises(ValueError, match=message):
        decode(msg, max_elements=1000)


def test_default_element_limit_rejects_absurd_shapes() -> None:
    with pytest.raises(ValueError, match=rf"expected at most {2**34}"):
        from_bytes("uint8", (2**17, 2**17, 2), b"")


@pytest.mark.parametrize("n_bytes", [0, 11, 13, 24])
def test_byte_count_must_match_shape_and_dtype(n_bytes: int) -> None:
    msg = pb.Tensor(dtype="bfloat16", shape=[2, 3], data=bytes(n_bytes))
    expected = rf"expected 12 bytes for shape \(2, 3\) dtype bfloat16, received {n_bytes}$"
    with pytest.raises(ValueError, match=expected):
        decode(msg)


def test_scalar_needs_one_element() -> None:
    with pytest.raises(ValueError, match=re.escape("expected 8 bytes for shape () dtype int64")):
        from_bytes("int64", (), b"")


@st.composite
def wire_parts(draw: st.DrawFn) -> tuple[str, list[int], bytes]:
    """Mostly-garbage messages, with a fair share of well-formed ones."""
    name = draw(st.sampled_from(NAMES) | st.text(max_size=10))
    shape = draw(
        st.lists(st.integers(0, 4) | st.integers(-(2**63), 2**63 - 1), max_size=MAX_NDIM + 2)
    )
    wanted = math.prod(shape) * (DTYPES[name].size if name in DTYPES else 1)
    if draw(st.booleans()) and 0 <= wanted <= 256:
        return name, shape, draw(st.binary(min_size=wanted, max_size=wanted))
    return name, shape, draw(st.binary(max_size=64))


@settings(max_examples=200, deadline=None)
@given(wire_parts())
def test_decode_returns_declared_array_or_raises_value_error(
    parts: tuple[str, list[int], bytes],
) -> None:
    name, shape, data = parts
    try:
        y = decode(pb.Tensor(dtype=name, shape=shape, data=data))
    except ValueError:
        return
    assert (y.dtype, y.shape) == (DTYPES[name], tuple(shape))
    mx.eval(y)
