"""Weights that travel: a worker gets only its slice's files from the coordinator, over
its authenticated channel, resumably, with every chunk checked.

Real gRPC workers on port 0, each with its own store in a temporary directory; the test
edges are a transfer cancelled half-way and a chunk corrupted after its checksum.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_load
from mlx_lm.generate import generate_step

from mlx_cluster.contract.errors import Unauthenticated
from mlx_cluster.contract.layers import LayerRange
from mlx_cluster.contract.progress import PROGRESS_ENV
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.coordinator.engine import weights
from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.coordinator.engine.weights import Transfer, WeightSender
from mlx_cluster.local import local_workers
from mlx_cluster.models.inspect import read_safetensors_header
from mlx_cluster.models.slice_files import (
    SLICE_FILE,
    DigestCache,
    FileSpec,
    model_key,
    stage_sources,
)
from mlx_cluster.models.slicing import load_stage
from mlx_cluster.models.weight_store import WeightStore, Written, store_root
from mlx_cluster.worker.runtime import WorkerSettings
from mlx_cluster.worker.server import RunningWorker, create_server

CHUNK = 4096  # small chunks, so that a tiny model's slice takes many
MIDDLE = LayerRange(1, 3, 4)  # a middle stage: layers only, no edges

Connect = Callable[..., Awaitable[tuple[WorkerClient, Path]]]


@pytest.fixture
def model(model_factory) -> Path:
    return model_factory("llama", num_layers=4, hidden_size=64, max_shard_bytes=60_000)


@pytest.fixture
async def connect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Connect]:
    """`await connect(token=..., client_token=...)`: a worker whose store (in a home of its
    own: MLX_CLUSTER_HOME) is empty, and a client."""
    monkeypatch.setenv("MLX_CLUSTER_HOME", str(tmp_path / "home"))
    workers: list[RunningWorker] = []
    clients: list[WorkerClient] = []

    async def make(token: str | None = None, client_token: str | None = None):
        store = store_root()
        worker = await create_server("127.0.0.1:0", WorkerSettings(name="w"), token=token)
        workers.append(worker)
        clients.append(WorkerClient(worker.address, token=client_token))
        return clients[-1], store

    yield make
    for client in clients:
        await client.close()
    for worker in workers:
        await worker.stop(grace=None)


def layer_numbers(slice_file: Path) -> set[int]:
    names = read_safetensors_header(slice_file)
    return {int(n.split("layers.")[1].split(".")[0]) for n in names if "layers." in n}


def test_slice_file_holds_the_stage_tensors_byte_for_byte(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "slice"
    out.mkdir()
    for source in stage_sources(model, range(1, 3), False, False):
        (out / source.name).write_bytes(source.read(0, source.size))
    assert layer_numbers(out / SLICE_FILE) == {1, 2}
    assert all("layers." in n for n in read_safetensors_header(out / SLICE_FILE))
    got, _ = load_stage(out, 1, 3)
    want, _ = load_stage(model, 1, 3)
    for (name, a), (_, b) in zip(tree_flatten(got.layers), tree_flatten(want.layers), strict=True):
        assert mx.array_equal(a, b), name


def test_first_and_last_stages_get_their_own_edges(model_factory) -> None:
    untied = {"tie_word_embeddings": False}
    model = model_factory("llama", num_layers=4, hidden_size=64, config_overrides=untied)

    def names(start: int, end: int) -> list[str]:
        first, last = start == 0, end == 4
        source = stage_sources(model, range(start, end), first, last)[-1]
        return [n for n in read_header_of(source) if "layers." not in n]

    assert names(0, 2) == ["model.embed_tokens.weight"]  # no final norm, no LM head
    assert names(2, 4) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]


def read_header_of(source) -> list[str]:
    length = int.from_bytes(source.read(0, 8), "little")
    return list(json.loads(source.read(8, length)))


async def test_worker_receives_its_slice_once(model: Path, connect: Connect) -> None:
    client, store = await connect()
    sender = WeightSender(model, CHUNK)
    first = await sender.send(client, MIDDLE)
    assert first.done and first.refused_chunks == 0
    received = store / sender.key
    assert layer_numbers(received / SLICE_FILE) == {1, 2}
    assert not list(received.glob("*.partial*"))
    again = await sender.send(client, MIDDLE)  # same files, same sha256: nothing sent
    assert again.done and again.sent_bytes == 0
    loaded = await client.load_layers(sender.key, 1, 3)
    assert (loaded.info.layer_start, loaded.info.layer_end) == (1, 3)


async def test_a_new_slice_replaces_the_old_one(model: Path, connect: Connect) -> None:
    client, store = await connect()
    sender = WeightSender(model, CHUNK)
    await sender.send(client, MIDDLE)
    await sender.send(client, LayerRange(0, 2, 4))  # the plan changed
    received = store / sender.key
    assert layer_numbers(received / SLICE_FILE) == {0, 1}
    assert sorted(p.name for p in received.iterdir() if "safetensors" in p.name) == [SLICE_FILE]


async def test_cut_transfer_resumes_where_the_verified_bytes_end(
    model: Path, connect: Connect
) -> None:
    client, store = await connect()
    total = sum(s.size for s in stage_sources(model, range(1, 3), False, False))
    task: asyncio.Task[Transfer] | None = None

    def cut_half_way(transfer: Transfer) -> None:
        if transfer.verified_bytes >= total // 2 and task is not None:
            task.cancel()

    sender = WeightSender(model, CHUNK, on_progress=cut_half_way)
    task = asyncio.create_task(sender.send(client, MIDDLE))
    with pytest.raises(asyncio.CancelledError):
        await task
    held = sender.transfers[client.address].verified_bytes
    assert total // 2 <= held < total
    await asyncio.sleep(0.2)  # the worker notices the cancelled call
    resumed = await WeightSender(model, CHUNK).send(client, MIDDLE)
    assert resumed.done
    assert resumed.sent_bytes == total - held  # no byte already written is sent again
    assert layer_numbers(store / sender.key / SLICE_FILE) == {1, 2}


async def test_corrupted_chunk_is_refused_and_sent_again(
    model: Path, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, store = await connect()
    chunk_message, corrupted = weights.chunk_message, []

    def flip_a_byte_once(key, spec, offset, data):  # after the checksum: as on a bad link
        message = chunk_message(key, spec, offset, data)
        if spec.name == SLICE_FILE and offset > 0 and not corrupted:
            corrupted.append(offset)
            message.data = bytes([message.data[0] ^ 0xFF]) + message.data[1:]
        return message

    monkeypatch.setattr(weights, "chunk_message", flip_a_byte_once)
    sender = WeightSender(model, CHUNK)
    transfer = await sender.send(client, MIDDLE)
    assert corrupted and transfer.refused_chunks == 1 and transfer.done
    want = next(s for s in stage_sources(model, range(1, 3), False, False) if s.name == SLICE_FILE)
    assert (store / sender.key / SLICE_FILE).read_bytes() == want.read(0, want.size)


async def test_nothing_is_accepted_without_the_token(model: Path, connect: Connect) -> None:
    client, store = await connect(token="right", client_token="wrong")
    with pytest.raises(Unauthenticated, match="wrong cluster token"):
        await WeightSender(model, CHUNK).send(client, MIDDLE)
    assert not store.exists()


def test_digests_are_kept_from_one_start_to_the_next(model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "digests.json"
    (first,) = [s for s in stage_sources(model, range(1, 3), False, False) if s.name == SLICE_FILE]
    want = first.spec(DigestCache(cache))
    (again,) = [s for s in stage_sources(model, range(1, 3), False, False) if s.name == SLICE_FILE]
    again.read = None  # type: ignore[method-assign, assignment]  # reading would fail
    assert again.spec(DigestCache(cache)) == want


@pytest.mark.slow
async def test_workers_sent_their_slices_answer_as_mlx_lm(
    model_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Two worker processes with empty caches of their own, given only the model's key;
    the coordinator draws a bar of each slice's bytes as they arrive (asked for here)."""
    monkeypatch.setenv(PROGRESS_ENV, "1")
    untied = {"tie_word_embeddings": False}
    model = model_factory(
        "llama", num_layers=4, quantize_bits=4, max_shard_bytes=60_000, config_overrides=untied
    )
    monkeypatch.setenv("MLX_CLUSTER_HOME", str(tmp_path / "coordinator"))  # its digests
    homes = [tmp_path / "w0", tmp_path / "w1"]
    lm, tokenizer = mlx_load(str(model))
    prompt = tokenizer.encode("hello there")
    want = [t for t, _ in generate_step(mx.array(prompt), lm, max_tokens=8)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    async with (
        local_workers(1, env={"MLX_CLUSTER_HOME": str(homes[0])}) as (w0,),
        local_workers(1, env={"MLX_CLUSTER_HOME": str(homes[1])}) as (w1,),
    ):
        cluster = await Cluster.start(model, [w0.address, w1.address], weights={"send": True})
        try:
            got = [s.token async for s in cluster.engine.generate_tokens(prompt, params)]
        finally:
            await cluster.close()
    assert got == want
    drawn = capsys.readouterr().err
    assert drawn.count("worker-0 weights") >= 2 and drawn.count("received") >= 2, drawn
    key = model_key(model)
    assert layer_numbers(homes[0] / "received" / key / SLICE_FILE) == {0, 1}
    assert layer_numbers(homes[1] / "received" / key / SLICE_FILE) == {2, 3}


def test_store_drops_bytes_a_kill_left_unverified(tmp_path: Path) -> None:
    store, data = WeightStore(tmp_path), bytes(range(256)) * 4
    spec = FileSpec("w.safetensors", len(data), hashlib.sha256(data).hexdigest())
    written = store.write("m-1", spec, 0, data[:512], hashlib.sha256(data[:512]).hexdigest())
    assert written == Written(512, complete=False)
    with (tmp_path / "m-1" / "w.safetensors.partial").open("ab") as f:
        f.write(b"torn")  # killed after writing, before recording
    assert store.held("m-1", spec) == Written(512, complete=False)
    done = store.write("m-1", spec, 512, data[512:], hashlib.sha256(data[512:]).hexdigest())
    assert done == Written(len(data), complete=True)
    assert (tmp_path / "m-1" / "w.safetensors").read_bytes() == data


def test_store_refuses_a_file_whose_whole_digest_differs(tmp_path: Path) -> None:
    store, data = WeightStore(tmp_path), b"x" * 100
    spec = FileSpec("config.json", len(data), "0" * 64)
    written = store.write("m-1", spec, 0, data, hashlib.sha256(data).hexdigest())
    assert written.verified_bytes == 0 and "sha256 does not match" in written.refused
    assert not (tmp_path / "m-1" / "config.json").exists()
