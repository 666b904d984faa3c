"""Start-up from a config file: plan from capabilities, load, serve; reload restarted workers."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import httpx
import pytest
import yaml

from mlx_cluster.contract.config_loader import load_config
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.coordinator.api.app import create_app
from mlx_cluster.coordinator.api.server import HttpServer
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.coordinator.engine.stages import RELOAD_WARN_AFTER
from mlx_cluster.coordinator.engine.startup import StartupError, start_from_config
from mlx_cluster.worker.runtime import WorkerSettings
from mlx_cluster.worker.server import create_server


def write_config(tmp_path, model, addresses, memory_gb):
    config = {
        "model": str(model),
        "workers": [
            {"address": a, "name": f"host-{i}", "memory_gb": m}
            for i, (a, m) in enumerate(zip(addresses, memory_gb, strict=True))
        ],
        "kv": {"max_session_tokens": 512},
        "reserve_gb": 0.5,
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def test_uneven_cluster_serves_the_split_plan_printed(tmp_path, start_workers, tiny_llama):
    clients = await start_workers(3)
    path = write_config(tmp_path, tiny_llama, [c.address for c in clients], [16, 8, 8])
    printed = subprocess.run(
        [sys.executable, "-m", "mlx_cluster", "plan", "--config", str(path), "--json"],
        capture_output=True,
        text=True,
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    plan = json.loads(printed.stdout)
    assert [w["layers"] for w in plan["workers"]] == [[0, 4], [4, 6], [6, 8]]

    config = load_config(path, dotenv=None, env={}).config
    cluster = await start_from_config(config)
    server = HttpServer(create_app(cluster, config.limits), "127.0.0.1", 0)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            reply = await http.post("/generate", json={"prompt": "the river", "max_tokens": 8})
            assert reply.status_code == 200 and reply.json()["text"]
            health = (await http.get("/health")).json()
        assert health["status"] == "ok"
        assert [w["layers"] for w in health["workers"]] == [w["layers"] for w in plan["workers"]]
        assert [w["name"] for w in health["workers"]] == ["host-0", "host-1", "host-2"]
        live = health["plan"]["workers"]
        assert [w["kv_tokens"] for w in live] == [w["kv_tokens"] for w in plan["workers"]]
        assert [w["kv_tokens"]["capacity"] for w in health["workers"]] == [
            w["kv_tokens"] for w in plan["workers"]
        ]
    finally:
        await server.stop()
        await cluster.close()


async def test_a_worker_that_restarts_empty_gets_its_slice_again(
    tmp_path, start_workers, tiny_llama
):
    clients = await start_workers(2)
    path = write_config(tmp_path, tiny_llama, [c.address for c in clients], [8, 8])
    cluster = await start_from_config(load_config(path, dotenv=None, env={}).config)
    try:
        victim = cluster.stages[1].client
        await start_workers.servers[victim.address].stop(grace=None)
        port = int(victim.address.rsplit(":", 1)[1])
        reborn = await create_server(f"127.0.0.1:{port}", WorkerSettings(name="reborn"))
        try:
            assert (await victim.info()).layer_end == 0  # empty after the restart
            await cluster.stage_manager.check_all()
            info = await victim.info()
            assert (info.layer_start, info.layer_end) == (4, 8)
            assert info.kv_capacity_tokens == cluster.plan.workers[1].kv_tokens
            assert cluster.stage_manager.reloads == 1
            chunks = [c async for c in cluster.generate("the river", SamplingParams(max_tokens=4))]
            assert chunks[-1].finish_reason in {"stop", "length"}
        finally:
            await reborn.stop(grace=None)
    finally:
        await cluster.close()


async def test_a_batch_larger_than_a_worker_takes_is_refused_with_both_numbers(
    start_workers, tiny_llama
):
    """batching.max_batch above a worker's reported limit: no cluster, a clear error.

    (Before, such a cluster started and every step of a large lane got INVALID_ARGUMENT.)
    """
    small = await start_workers(1, max_batch=8)
    large = await start_workers(1)
    addresses = [small[0].address, large[0].address]
    with pytest.raises(StartupError) as refused:
        await Cluster.start(tiny_llama, addresses, batching={"max_batch": 32})
    message = str(refused.value)
    assert "batching.max_batch is 32" in message and "at most 8 sessions" in message
    assert "worker worker-0 takes" in message  # its name, from its Info
    for client in small + large:  # nothing was loaded
        assert (await client.info()).layers is None
    cluster = await Cluster.start(tiny_llama, addresses, batching={"max_batch": 8})
    await cluster.close()


async def test_a_reload_that_keeps_failing_is_logged_as_a_warning(
    tmp_path, start_workers, tiny_llama, caplog
):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    clients = await start_workers(2)
    cluster = await Cluster.start(model, [c.address for c in clients])
    try:
        victim = cluster.stages[1]
        port = int(victim.client.address.rsplit(":", 1)[1])
        await start_workers.servers[victim.client.address].stop(grace=None)
        reborn = await create_server(f"127.0.0.1:{port}", WorkerSettings(name="reborn"))
        shutil.rmtree(model)  # the restarted worker cannot read its slice any more
        try:
            with caplog.at_level(logging.INFO, logger="mlx_cluster.coordinator.engine.stages"):
                for _ in range(RELOAD_WARN_AFTER):
                    await cluster.stage_manager.check_all()
            failures = [r for r in caplog.records if "reloading" in r.getMessage()]
            assert [r.levelno for r in failures] == [logging.INFO] * (RELOAD_WARN_AFTER - 1) + [
                logging.WARNING
            ]
            assert f"({RELOAD_WARN_AFTER} in a row)" in failures[-1].getMessage()
            assert cluster.stage_manager.reloads == 0
        finally:
            await reborn.stop(grace=None)
    finally:
        await cluster.close()


async def test_health_tells_the_info_round_trip_and_the_last_steps_network_time_apart(
    serve_cluster,
):
    url, _ = await serve_cluster()
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        before = (await http.get("/health")).json()["workers"]
        assert all(w["last_round_trip_ms"] > 0 for w in before)
        assert all(w["last_step_network_ms"] is None for w in before)  # no step yet
        reply = await http.post("/generate", json={"prompt": "the river", "max_tokens": 4})
        assert reply.status_code == 200
        after = (await http.get("/health")).json()["workers"]
    assert all(w["last_step_network_ms"] >= 0 for w in after)
    assert all(w["last_round_trip_ms"] > 0 for w in after)
