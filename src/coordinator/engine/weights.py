"""Weights that travel, the coordinator's side: a worker that lacks its slice's files gets
them from this host, over the worker's own authenticated channel.

For each stage the files are the model's metadata and one safetensors file of the slice's
tensors (models/slice_files.py). The worker first says what it holds (HaveWeights): files
it has with the same sha256 are skipped, a partial file resumes at its verified bytes.
The rest goes on one PutWeights call, a chunk at a time, each answered with the bytes the
worker verified and wrote; a refused chunk (its checksum failed on the way) is sent again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from mlx_cluster.contract.errors import ClusterError, WorkerUnavailable
from mlx_cluster.contract.layers import LayerRange
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.rpc import INFO_DEADLINE_S
from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.coordinator.engine.forward_stream import error_from_rpc
from mlx_cluster.models.slice_files import (
    DigestCache,
    FileSource,
    FileSpec,
    model_key,
    stage_sources,
)

log = logging.getLogger(__name__)

CHUNK_TIMEOUT_S = 60.0  # for a chunk's answer
MAX_REFUSALS = 3  # chunks refused in a row before the transfer fails
LOG_EVERY = 0.25  # a progress line each time a quarter more of the transfer is in


@dataclass
class Transfer:
    """One worker's transfer of a slice, as the worker's answers report it."""

    worker: str  # its name
    address: str
    layers: LayerRange
    total_bytes: int  # of every file of the slice
    verified: dict[str, int] = field(default_factory=dict)  # file -> bytes the worker holds
    sent_bytes: int = 0  # chunk bytes sent on this call, again after a refusal included
    refused_chunks: int = 0
    started: float = field(default_factory=time.monotonic)
    logged: float = 0.0  # the share of bytes in at the last progress line

    @property
    def verified_bytes(self) -> int:
        return sum(self.verified.values())

    @property
    def done(self) -> bool:
        return self.verified_bytes == self.total_bytes


class WeightSender:
    """Sends the slices of the model at `model` (this host's copy) to workers."""

    def __init__(
        self,
        model: Path,
        chunk_bytes: int,
        on_progress: Callable[[Transfer], None] | None = None,
        digests: DigestCache | None = None,
    ) -> None:
        """`on_progress` is called after every chunk a worker answers; `digests` keeps the
        slices' sha256 from one start to the next."""
        self.model = model
        self.key = model_key(model)  # what the workers load, once they hold the files
        self.chunk_bytes = chunk_bytes
        self.transfers: dict[str, Transfer] = {}  # by worker address, the latest of each
        self.on_progress = on_progress
        self._digests = digests
        self._files: dict[tuple[int, int, int], list[tuple[FileSource, FileSpec]]] = {}

    async def _stage_files(self, layers: LayerRange) -> list[tuple[FileSource, FileSpec]]:
        where = (layers.start, layers.end, layers.total)
        if where not in self._files:

            def build() -> list[tuple[FileSource, FileSpec]]:
                first, last = layers.start == 0, layers.end == layers.total
                sources = stage_sources(self.model, range(*where[:2]), first, last)
                return [(source, source.spec(self._digests)) for source in sources]

            self._files[where] = await asyncio.to_thread(build)
        return self._files[where]

    async def send(self, client: WorkerClient, layers: LayerRange) -> Transfer:
        """Make the worker hold the files of `layers`; returns what the transfer did.

        Raises:
            ClusterError: the worker refused or failed (a chunk refused MAX_REFUSALS times
                in a row, no answer within CHUNK_TIMEOUT_S, the call broke).
        """
        files = await self._stage_files(layers)
        stub, metadata = client.service(pb_grpc.WeightServiceStub)
        request = pb.HaveWeightsRequest(model_key=self.key, files=[_wire(s) for _, s in files])
        try:
            reply = await stub.HaveWeights(request, timeout=INFO_DEADLINE_S, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, client.name) from exc
        if len(reply.files) != len(files):
            raise ClusterError(
                f"worker {client.name} answered HaveWeights for {len(reply.files)} files, "
                f"asked about {len(files)}"
            )
        transfer = Transfer(client.name, client.address, layers, sum(s.size for _, s in files))
        transfer.verified = {held.name: held.verified_bytes for held in reply.files}
        missing = [
            (src, s, h) for (src, s), h in zip(files, reply.files, strict=True) if not h.complete
        ]
        self.transfers[client.address] = transfer
        if not missing:
            log.info(
                "worker %s holds the %d files of layers %s of %s already (same sha256)",
                client.name,
                len(files),
                layers,
                self.key,
            )
            return transfer
        resumed = sum(h.verified_bytes for _, _, h in missing)
        log.info(
            "sending worker %s layers %s of %s: %d of %d files, %.1f MB%s",
            client.name,
            layers,
            self.key,
            len(missing),
            len(files),
            sum(s.size - h.verified_bytes for _, s, h in missing) / 1e6,
            f" (resuming after {resumed / 1e6:.1f} MB already verified)" if resumed else "",
        )
        call = stub.PutWeights(metadata=metadata)
        try:
            for source, spec, held in missing:
                await self._send_file(call, source, spec, held.verified_bytes, transfer)
            await call.done_writing()
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, client.name) from exc
        finally:
            call.cancel()  # nothing once it ended; else the worker stops reading
        seconds = time.monotonic() - transfer.started
        log.info(
            "worker %s holds layers %s of %s: %.1f MB sent in %.1f s, %d chunks refused",
            client.name,
            layers,
            self.key,
            transfer.sent_bytes / 1e6,
            seconds,
            transfer.refused_chunks,
        )
        return transfer

    async def _send_file(
        self,
        call: grpc.aio.StreamStreamCall,
        source: FileSource,
        spec: FileSpec,
        offset: int,
        transfer: Transfer,
    ) -> None:
        """Chunks of one file from `offset` until the worker holds all of it."""
        refusals = 0
        while True:
            data = await asyncio.to_thread(source.read, offset, self.chunk_bytes)
            await call.write(chunk_message(self.key, spec, offset, data))
            transfer.sent_bytes += len(data)
            try:
                ack = await asyncio.wait_for(call.read(), CHUNK_TIMEOUT_S)
            except TimeoutError as exc:
                raise WorkerUnavailable(
                    f"worker {transfer.worker} did not answer a chunk of {spec.name} within "
                    f"{CHUNK_TIMEOUT_S:g} s"
                ) from exc
            if ack is grpc.aio.EOF:
                raise WorkerUnavailable(f"worker {transfer.worker} ended the transfer early")
            transfer.verified[spec.name] = ack.verified_bytes
            if ack.refused:
                refusals += 1
                transfer.refused_chunks += 1
                log.warning(
                    "worker %s refused a chunk of %s (%s): sending again from byte %d",
                    transfer.worker,
                    spec.name,
                    ack.refused,
                    ack.verified_bytes,
                )
                if refusals >= MAX_REFUSALS:
                    raise ClusterError(
                        f"worker {transfer.worker} refused {refusals} chunks of {spec.name} in "
                        f"a row (last: {ack.refused}); giving up the transfer"
                    )
            else:
                refusals = 0
            if self.on_progress is not None:
                self.on_progress(transfer)
            done = transfer.verified_bytes / transfer.total_bytes
            if done >= transfer.logged + LOG_EVERY:
                transfer.logged = done
                log.info("worker %s: %.0f%% of its slice's bytes in", transfer.worker, 100 * done)
            if ack.complete:
                return
            offset = ack.verified_bytes


def chunk_message(key: str, spec: FileSpec, offset: int, data: bytes) -> pb.WeightChunk:
    """A chunk on the wire, with the sha256 of its bytes."""
    return pb.WeightChunk(
        model_key=key,
        file=_wire(spec),
        offset=offset,
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _wire(spec: FileSpec) -> pb.WeightFile:
    return pb.WeightFile(name=spec.name, size=spec.size, sha256=spec.sha256)
