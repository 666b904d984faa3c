"""Progress bars: a fetch shows its bytes advancing, a GGUF import its tensors, the
coordinator each worker's load; nothing is drawn when stdout is not a terminal unless
asked (MLX_CLUSTER_PROGRESS=1)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from mlx_cluster.contract.progress import PROGRESS_ENV
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.models.gguf_import import import_gguf
from mlx_cluster.models.shards import shards_for, weight_map
from mlx_cluster.models.sources import resolve_model
from tests.test_gguf_import import save_with_mlx
from tests.test_gguf_import import tiny_llama as tiny_gguf_model
from tests.test_sources import REPO, FakeHub

UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
BYTE_FIGURES = re.compile(r"([\d.]+) (B|kB|MB|GB)/([\d.]+) (B|kB|MB|GB)")


def byte_figures(drawn: str) -> list[tuple[float, float]]:
    """Every `done/total` figure of a byte bar drawn, in order (bytes)."""
    return [
        (float(done) * UNITS[u1], float(total) * UNITS[u2])
        for done, u1, total, u2 in BYTE_FIGURES.findall(drawn)
    ]


def count_figures(drawn: str, unit: str) -> list[tuple[int, int]]:
    return [(int(d), int(t)) for d, t in re.findall(rf"(\d+)/(\d+) {unit}", drawn)]


def assert_advancing(figures: list[tuple[float, float]]) -> None:
    done = [d for d, _ in figures]
    assert len(set(done)) >= 3, figures  # more than a start and an end
    assert done == sorted(done), figures
    assert figures[-1][0] == figures[-1][1] > 0, figures


@pytest.fixture
def sharded(model_factory):
    return model_factory("llama", max_shard_bytes=120_000)


def test_a_fetch_shows_its_bytes_advancing(tmp_path, sharded, monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    hub = FakeHub(sharded, tmp_path / "local")
    resolve_model(REPO, layers=range(0, 8), hub=hub, offline=False)
    drawn = capsys.readouterr().err
    assert f"fetching {REPO}" in drawn
    figures = byte_figures(drawn)
    assert_advancing(figures)
    weights = weight_map(sharded)
    assert weights is not None
    shards = shards_for(weights, layers=range(0, 8))
    total = sum((sharded / s).stat().st_size for s in shards)
    assert figures[-1][1] == pytest.approx(total, rel=0.01)  # as drawn: 3 digits
    assert f"{len(shards)}/{len(shards)} shards" in drawn


def test_nothing_is_drawn_when_stdout_is_not_a_terminal(tmp_path, sharded, monkeypatch, capsys):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    resolve_model(REPO, hub=FakeHub(sharded, tmp_path / "local"), offline=False)
    monkeypatch.setenv(PROGRESS_ENV, "0")
    resolve_model(REPO, hub=FakeHub(sharded, tmp_path / "local2"), offline=False)
    drawn = capsys.readouterr()
    assert drawn.out == "" and "fetching" not in drawn.err


def test_a_gguf_import_shows_its_tensors_advancing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    save_with_mlx(tmp_path / "tiny.gguf", tiny_gguf_model())
    import_gguf(tmp_path / "tiny.gguf", tmp_path / "imported")
    drawn = capsys.readouterr().err
    converting, _, writing = drawn.partition("writing tensors")
    assert "converting tensors" in converting and writing
    tensors = 3 + 9 * 2  # embedding, final norm, head; 9 tensors a layer
    assert_advancing(count_figures(converting, "tensors"))
    assert count_figures(converting, "tensors")[-1] == (tensors, tensors)
    assert count_figures(writing, "tensors")[-1] == (tensors, tensors)


async def test_the_coordinator_draws_a_bar_a_worker_while_they_load(
    start_workers, tiny_llama, monkeypatch, capsys
):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    clients = await start_workers(2)
    cluster = await Cluster.start(tiny_llama, [c.address for c in clients], [3, 5])
    await cluster.close()
    drawn = capsys.readouterr().err
    for name, layers, count in (("worker-0", "[0, 3)", 3), ("worker-1", "[3, 8)", 5)):
        assert f"{name} layers {layers}" in drawn
        assert (0, count) in count_figures(drawn, "layers")
        assert (count, count) in count_figures(drawn, "layers")
    assert drawn.count("loaded, ") >= 2


def test_the_progress_flag_draws_bars_into_a_pipe(tmp_path):
    save_with_mlx(tmp_path / "tiny.gguf", tiny_gguf_model())
    env = {k: v for k, v in os.environ.items() if k != PROGRESS_ENV}
    command = [sys.executable, "-m", "mlx_cluster", "--progress", "models", "import-gguf"]
    done = subprocess.run(
        [*command, str(tmp_path / "tiny.gguf"), str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )  # fmt: skip
    assert "21/21 tensors" in done.stderr and "imported into" in done.stdout
    quiet = subprocess.run(
        [*command[:3], *command[4:], str(tmp_path / "tiny.gguf"), str(tmp_path / "out2")],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )  # fmt: skip
    assert "tensors" not in quiet.stderr
