"""The WeightService servicer: a worker receives the files of its slice (weights that travel).

Thin, as LayerServicer is: it checks names, hands each chunk to the WeightStore off the
event loop and answers with what the store holds. A refused chunk (checksum, offset) is
answered in band, so the sender sends again from the verified bytes on the same call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from mlx_cluster.contract.errors import ClusterError
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.models.slice_files import FileSpec
from mlx_cluster.models.weight_store import WeightStore, check_name

log = logging.getLogger(__name__)

LOG_EVERY = 0.25  # a progress line each time a file's verified bytes pass a quarter more


def _as_cluster_error(exc: ClusterError | OSError) -> ClusterError:
    """A contract error as it is; a failure of the worker's disk (full, not writable) as
    INTERNAL, saying so."""
    return exc if isinstance(exc, ClusterError) else ClusterError(f"the worker's disk: {exc}")


def _spec(file: pb.WeightFile) -> FileSpec:
    return FileSpec(check_name(file.name, "file name"), file.size, file.sha256)


class WeightServicer(pb_grpc.WeightServiceServicer):
    """Receives model files into `store`."""

    def __init__(self, store: WeightStore) -> None:
        self.store = store

    async def HaveWeights(
        self, request: pb.HaveWeightsRequest, context: grpc.aio.ServicerContext
    ) -> pb.HaveWeightsResponse:
        try:
            specs = [_spec(f) for f in request.files]
            held = [await asyncio.to_thread(self.store.held, request.model_key, s) for s in specs]
        except (ClusterError, OSError) as exc:
            error = _as_cluster_error(exc)
            await context.abort(error.code, f"cannot look up {request.model_key[:64]!r}: {error}")
        return pb.HaveWeightsResponse(
            files=[
                pb.HeldFile(name=s.name, verified_bytes=h.verified_bytes, complete=h.complete)
                for s, h in zip(specs, held, strict=True)
            ]
        )

    async def PutWeights(
        self, request_iterator: AsyncIterator[pb.WeightChunk], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WeightAck]:
        logged: dict[str, float] = {}
        async for chunk in request_iterator:
            try:
                spec = _spec(chunk.file)
                written = await asyncio.to_thread(
                    self.store.write, chunk.model_key, spec, chunk.offset, chunk.data, chunk.sha256
                )
            except (ClusterError, OSError) as exc:
                error = _as_cluster_error(exc)
                await context.abort(error.code, f"cannot write {chunk.file.name[:64]!r}: {error}")
            done = written.verified_bytes / spec.size if spec.size else 1.0
            if done >= logged.get(spec.name, 0.0) + LOG_EVERY or written.complete:
                logged[spec.name] = done
                log.info("receiving %s: %.0f%% of %d bytes", spec.name, 100 * done, spec.size)
            yield pb.WeightAck(
                file=spec.name,
                verified_bytes=written.verified_bytes,
                complete=written.complete,
                refused=written.refused,
            )
