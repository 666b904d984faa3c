"""A name `mlx-cluster models list` shows works wherever a model is asked for.

`plan --model`, `model:` in the config file, `up --model`, the coordinator and its workers
all find the model through `resolve_model`; unknown or ambiguous names are a clean error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_cluster.contract.config_loader import load_config
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.coordinator.engine.startup import start_from_config
from tests.test_sources import hf_cache, imported

HF_ID = "test-org/tiny-llama"
CONFIG = (
    "workers:\n  - {address: 'a:1', memory_gb: 2}\n  - {address: 'b:1', memory_gb: 1}\n"
    "reserve_gb: 0.5\n"
)


@pytest.fixture
def env(tmp_path: Path, tiny_llama: Path) -> dict[str, str]:
    """Our cache with the tiny model imported as `tiny`, a Hugging Face cache with it as HF_ID."""
    imported(tmp_path, tiny_llama, "tiny")
    cache = hf_cache(tmp_path, tiny_llama, HF_ID)
    return {
        **os.environ,
        "MLX_CLUSTER_HOME": str(tmp_path),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
    }


def cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mlx_cluster", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def listed_names(env: dict[str, str]) -> list[str]:
    rows = cli(env, "models", "list").stdout.splitlines()[1:]  # below the header
    return [row.split()[0] for row in rows]


def test_plan_takes_every_name_models_list_shows(env, tmp_path):
    names = listed_names(env)
    assert names == ["tiny", HF_ID]
    config = tmp_path / "cluster.yaml"
    for name in [*names, "tiny-llama"]:  # the last part of a cached id names it too
        config.write_text(CONFIG)
        planned = cli(env, "plan", "--config", str(config), "--model", name)
        assert planned.returncode == 0, planned.stderr
        assert "[0, 5)" in planned.stdout and "[5, 8)" in planned.stdout  # 2:1 memory
    config.write_text(f"model: tiny\n{CONFIG}")
    planned = cli(env, "plan", "--config", str(config))
    assert planned.returncode == 0, planned.stderr


def test_an_unknown_or_ambiguous_name_lists_the_models_there_are(env, tmp_path, tiny_llama):
    config = tmp_path / "cluster.yaml"
    config.write_text(f"model: nope\n{CONFIG}")
    unknown = cli(env, "plan", "--config", str(config))
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("mlx-cluster plan: model 'nope' is neither a directory")
    assert f"2 model(s) here: tiny, {HF_ID}" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    hf_cache(tmp_path, tiny_llama, "other-org/tiny-llama")
    ambiguous = cli(env, "plan", "--config", str(config), "--model", "tiny-llama")
    assert ambiguous.returncode == 2
    assert f"ambiguous: 2 cached Hugging Face models end in it: other-org/tiny-llama, {HF_ID}" in (
        ambiguous.stderr
    )


def test_up_with_an_unknown_name_stops_before_any_worker_starts(env):
    unknown = cli(env, "up", "--model", "nope", "--prompt", "hello")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("mlx-cluster up: model 'nope' is neither a directory")
    assert f"2 model(s) here: tiny, {HF_ID}" in unknown.stderr
    assert "Traceback" not in unknown.stderr


@pytest.mark.slow
def test_up_answers_with_a_listed_name(env):
    answer = cli(env, "up", "--model", "tiny", "--prompt", "hello", "--max-tokens", "4")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip()


async def test_coordinator_and_workers_load_a_listed_name(
    tmp_path, tiny_llama, start_workers, monkeypatch
):
    monkeypatch.setenv("MLX_CLUSTER_HOME", str(tmp_path))
    imported(tmp_path, tiny_llama, "tiny")
    clients = await start_workers(2)
    workers = "".join(f"  - {{address: '{c.address}', memory_gb: 2}}\n" for c in clients)
    config = tmp_path / "cluster.yaml"
    config.write_text(f"model: tiny\nworkers:\n{workers}")
    cluster = await start_from_config(load_config(config, dotenv=None, env={}).config)
    try:
        infos = [await c.info() for c in clients]
        assert [(i.model, i.layer_start, i.layer_end) for i in infos] == [
            ("tiny", 0, 4),
            ("tiny", 4, 8),
        ]
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        text = "".join([chunk.text async for chunk in cluster.generate("the river", params)])
        assert text
    finally:
        await cluster.close()
