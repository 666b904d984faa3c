"""Hidden states through shared memory between workers on one host: exact, reused,
refused where they do not belong, and the cluster's tokens unchanged."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.local import local_workers
from mlx_cluster.tensor.shared import Probe, SharedArena, SharedViews, can_open
from tests.conftest import make_engine
from tests.test_golden import assert_same, pipeline_run, reference

PROMPT = [(i * 41) % 250 + 3 for i in range(60)]


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_a_tensor_through_shared_memory_arrives_bit_for_bit(dtype):
    array = mx.random.normal((2, 300, 257)).astype(dtype)
    arena, views = SharedArena(min_bytes=1), SharedViews()
    try:
        message = pb.Tensor()
        name = arena.put(array, message)
        assert name and message.shared.segment == name and not message.data
        got = views.decode(message)
        assert got.dtype == dtype and got.shape == array.shape
        assert mx.array_equal(got, array).item()
    finally:
        views.close()
        arena.close()


def test_a_small_tensor_stays_in_the_message():
    arena = SharedArena(min_bytes=1 << 20)
    message = pb.Tensor()
    assert arena.put(mx.zeros((1, 1, 64)), message) is None
    assert not message.HasField("shared") and arena.segments == 0
    arena.close()


def test_a_segment_takes_the_next_tensor_once_released_and_grows_when_too_small():
    arena = SharedArena(min_bytes=1)
    small = mx.ones((4, 1000), dtype=mx.float32)  # 16 kB: a 1 MiB segment
    try:
        first = arena.put(small, pb.Tensor())
        second = arena.put(small, pb.Tensor())
        assert first and second and first != second  # the first is not read yet
        arena.release(first)
        assert arena.put(small, pb.Tensor()) == first
        arena.release(first)
        large = mx.ones((2, 1 << 20), dtype=mx.float32)  # 8 MiB
        grown = arena.put(large, pb.Tensor())
        assert grown not in (first, second)
        assert arena.segments == 2  # the too-small free one made room for the larger
        assert not can_open(first)
    finally:
        arena.close()


def test_a_closed_arena_leaves_no_segment_to_open():
    arena, views = SharedArena(min_bytes=1), SharedViews()
    message = pb.Tensor()
    name = arena.put(mx.ones((8, 8)), message)
    arena.close()
    assert name and not can_open(name)
    with pytest.raises(ValueError, match="cannot open segment"):
        views.decode(message)


def test_a_receiver_opens_only_its_own_kind_of_segment_and_reads_within_it():
    arena, views = SharedArena(min_bytes=1), SharedViews()
    try:
        message = pb.Tensor()
        arena.put(mx.ones((8, 8)), message)
        foreign = pb.Tensor()
        foreign.CopyFrom(message)
        foreign.shared.segment = "psm_12345"
        with pytest.raises(ValueError, match="not a segment name"):
            views.decode(foreign)
        overrun = pb.Tensor()
        overrun.CopyFrom(message)
        overrun.shared.nbytes = 1 << 30
        with pytest.raises(ValueError, match="bytes in segment"):
            views.decode(overrun)
    finally:
        views.close()
        arena.close()


def test_another_process_opens_a_probe_and_leaves_it_in_place():
    """The peer test itself, across processes; the peer's exit must not remove the probe
    (Python's resource tracker would, for a segment it adopted)."""
    probe = Probe()
    check = f"from mlx_cluster.tensor.shared import can_open; print(can_open({probe.name!r}))"
    try:
        out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
        assert out.stdout.strip() == "True", out.stderr
        assert can_open(probe.name)  # still there after the other process exited
    finally:
        probe.close()
    assert not can_open(probe.name)


async def test_a_prompt_relayed_through_shared_memory_gives_mlx_lm_tokens(
    model_factory, start_workers, caplog
):
    """In-process workers on one host: every hop's hidden states go through shared memory
    (min 1 byte), three stages of an uneven split, and the tokens are mlx-lm's."""
    model = model_factory("qwen2")
    params = SamplingParams(max_tokens=10)
    want = reference(model, PROMPT, params)
    caplog.set_level(logging.INFO, logger="mlx_cluster.worker.relay")
    clients = await start_workers(3, shared_memory_min_bytes=1)
    engine = await make_engine(model, clients, [2, 4, 2], prefill_chunk=16)
    assert_same(await pipeline_run(engine, PROMPT, params), want)
    assert "shares this worker's memory" in caplog.text


async def test_worker_processes_relay_through_shared_memory(model_factory):
    """Worker processes: the prompt's hidden states cross through shared memory, the
    answer is mlx-lm's, and a worker that takes none (0) still gets them as messages."""
    model = model_factory("llama")
    params = SamplingParams(max_tokens=8)
    want = [token for token, _ in reference(model, PROMPT, params)]
    for min_kb in ("1", "0"):
        async with local_workers(3, ["--shared-memory-min-kb", min_kb]) as workers:
            cluster = await Cluster.start(model, [w.address for w in workers], [3, 3, 2])
            try:
                probes = {s.client.shared_memory_probe for s in cluster.stages} - {""}
                assert len(probes) == (3 if min_kb == "1" else 0)
                got = [t.token async for t in cluster.engine.generate_tokens(PROMPT, params)]
                assert got == want
                if PROC_MAPS:  # the relay's segments, held while its stream is open
                    pids = [w.process.pid for w in workers]
                    relayed = set().union(*map(mapped_segments, pids)) - probes
                    assert bool(relayed) == (min_kb == "1"), relayed
            finally:
                await cluster.close()


PROC_MAPS = Path("/proc/self/maps").is_file()  # Linux: what each process has mapped


def mapped_segments(pid: int) -> set[str]:
    """Our shared-memory segments that process `pid` has mapped (only its own, unlike a
    listing of /dev/shm, which tests running beside this one also write to)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {Path(line.split()[-1]).name for line in lines if "/dev/shm/mlxc-" in line}
