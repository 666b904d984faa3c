"""MLX arrays on the wire: exact `{dtype, shape, raw bytes}` conversion."""

from mlx_cluster.tensor.wire import (
    DEFAULT_MAX_ELEMENTS,
    DTYPES,
    MAX_NDIM,
    decode,
    dtype_name,
    encode,
    from_bytes,
    to_bytes,
)

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "DTYPES",
    "MAX_NDIM",
    "decode",
    "dtype_name",
    "encode",
    "from_bytes",
    "to_bytes",
]
