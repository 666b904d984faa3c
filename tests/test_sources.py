"""Model sources: local directories, names `models list` shows, and Hugging Face model ids
(cached, offline, or fetched)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from mlx_cluster.models import sources
from mlx_cluster.models.shards import shards_for, weight_map
from mlx_cluster.models.sources import ModelNotAvailable, local_models, resolve_model

REPO = "test-org/tiny"
CHUNK_BYTES = 64 * 1024  # what the fake hub's downloads report at a time


def hf_cache(tmp_path: Path, model: Path, repo_id: str = REPO) -> Path:
    """A Hugging Face cache (`tmp_path/hub`) holding `model` as the snapshot of `repo_id`."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return cache


def imported(home: Path, model: Path, name: str) -> Path:
    """`model` as if `mlx-cluster models import-gguf` had put it in our cache under `name`."""
    return Path(shutil.copytree(model, home / "models" / name))


class FakeHub:
    """A remote repository in a directory; the first tries of `flaky` fail."""

    def __init__(self, remote: Path, local: Path, flaky: str = "", failures: int = 0) -> None:
        self.remote, self.local = remote, local
        self.flaky, self.failures = flaky, failures
        self.fetched: list[str] = []

    def list_files(self, repo: str) -> list[str]:
        return sorted(p.name for p in self.remote.iterdir())

    def file_sizes(self, repo: str, filenames: list[str]) -> dict[str, int]:
        return {name: (self.remote / name).stat().st_size for name in filenames}

    def download(self, repo: str, filename: str, on_bytes: Callable[[int], None]) -> str:
        """Copies the file in CHUNK_BYTES pieces, reporting each (a real download's way)."""
        if filename == self.flaky and self.failures:
            self.failures -= 1
            raise ConnectionError("connection reset")
        self.local.mkdir(parents=True, exist_ok=True)
        with (
            (self.remote / filename).open("rb") as source,
            (self.local / filename).open("wb") as target,
        ):
            while piece := source.read(CHUNK_BYTES):
                target.write(piece)
                on_bytes(len(piece))
        self.fetched.append(filename)
        return str(self.local / filename)

    def cached(self, repo: str, filename: str) -> str | None:
        path = self.local / filename
        return str(path) if path.exists() else None

    def cached_repos(self) -> dict[str, Path]:
        return {}


@pytest.fixture
def sharded(model_factory) -> Path:
    return model_factory("llama", max_shard_bytes=120_000)


def test_a_directory_is_used_as_it_is(tiny_llama):
    assert resolve_model(str(tiny_llama)) == tiny_llama


def test_neither_directory_nor_id(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_CLUSTER_HOME", str(tmp_path))
    hub = sources.HuggingFaceHub(str(tmp_path / "hub"))
    with pytest.raises(ModelNotAvailable, match=r"neither a directory.* no models here"):
        resolve_model("/no/such/dir", hub=hub)


# --- names `mlx-cluster models list` shows -----------------------------------------------


def test_every_listed_name_resolves_to_its_directory(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("MLX_CLUSTER_HOME", str(tmp_path))
    mine = imported(tmp_path, tiny_llama, "tiny")
    hub = sources.HuggingFaceHub(str(hf_cache(tmp_path, tiny_llama, "test-org/tiny-llama")))
    listed = local_models(hub)
    assert [m.name for m in listed] == ["tiny", "test-org/tiny-llama"]
    for model in listed:
        assert resolve_model(model.name, hub=hub, offline=True) == model.path
    assert resolve_model("tiny", hub=hub) == mine
    # The last part of a cached id is enough when it names one model.
    assert resolve_model("tiny-llama", hub=hub, offline=True) == listed[1].path


def test_unknown_and_ambiguous_names_list_what_there_is(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("MLX_CLUSTER_HOME", str(tmp_path))
    imported(tmp_path, tiny_llama, "tiny")
    hf_cache(tmp_path, tiny_llama, "org-a/same")
    hub = sources.HuggingFaceHub(str(hf_cache(tmp_path, tiny_llama, "org-b/same")))
    with pytest.raises(ModelNotAvailable, match=r"3 model.s. here: tiny, org-a/same, org-b/same"):
        resolve_model("nope", hub=hub, offline=True)
    with pytest.raises(ModelNotAvailable, match=r"ambiguous: 2 .*: org-a/same, org-b/same"):
        resolve_model("same", hub=hub, offline=True)
    with pytest.raises(ModelNotAvailable, match=r"not in the Hugging Face cache.*3 model"):
        resolve_model("org-c/same", hub=hub, offline=True)


def test_offline_uses_the_cache(tmp_path, sharded):
    cache = hf_cache(tmp_path, sharded)
    hub = sources.HuggingFaceHub(str(cache))
    path = resolve_model(REPO, layers=range(0, 2), hub=hub, offline=True)
    assert (path / "config.json").is_file() and path.name == "0123abcd"


def test_offline_names_exactly_what_is_missing(tmp_path, sharded):
    cache = hf_cache(tmp_path, sharded)
    weights = weight_map(sharded)
    assert weights is not None
    needed = sorted(shards_for(weights, layers=range(6, 8)))
    snapshot = cache / "models--test-org--tiny" / "snapshots" / "0123abcd"
    (snapshot / needed[0]).unlink()
    hub = sources.HuggingFaceHub(str(cache))
    with pytest.raises(ModelNotAvailable, match=rf"without 1 file.*{re.escape(needed[0])}"):
        resolve_model(REPO, layers=range(6, 8), hub=hub, offline=True)
    # Layers whose shards are all there still resolve.
    assert needed[0] not in shards_for(weights, layers=range(0, 1))
    resolve_model(REPO, layers=range(0, 1), hub=hub, offline=True)
    with pytest.raises(ModelNotAvailable, match="not in the Hugging Face cache"):
        resolve_model("test-org/absent", hub=hub, offline=True)


def test_online_fetches_only_the_shards_of_this_host_with_retries(tmp_path, sharded, monkeypatch):
    monkeypatch.setattr(sources, "BACKOFF_S", 0.0)
    weights = weight_map(sharded)
    assert weights is not None
    mine = shards_for(weights, layers=range(2, 4))
    flaky = sorted(mine)[0]
    hub = FakeHub(sharded, tmp_path / "local", flaky=flaky, failures=2)
    path = resolve_model(REPO, layers=range(2, 4), hub=hub, offline=False)
    fetched_shards = {f for f in hub.fetched if f.endswith(".safetensors")}
    assert fetched_shards == mine and len(mine) < len(set(weights.values()))
    assert (path / "tokenizer.json").is_file() and (path / "config.json").is_file()
    hub = FakeHub(sharded, tmp_path / "local2", flaky="config.json", failures=9)
    with pytest.raises(ModelNotAvailable, match=r"config\.json .* after 4 tries"):
        resolve_model(REPO, hub=hub, offline=False)


def test_facts_of_a_partly_fetched_model_estimate_the_missing_layers(tmp_path, sharded):
    from mlx_cluster.models.inspect import model_facts

    weights = weight_map(sharded)
    assert weights is not None
    partial = tmp_path / "partial"
    shutil.copytree(sharded, partial)
    for shard in set(weights.values()) - shards_for(weights, edges=True):
        (partial / shard).unlink()
    full, part = model_facts(sharded), model_facts(partial)
    assert part.num_layers == full.num_layers
    assert (part.embedding_bytes, part.head_bytes) == (full.embedding_bytes, full.head_bytes)
    assert all(b > 0 for b in part.layer_weight_bytes)
    typical = sorted(full.layer_weight_bytes)[len(full.layer_weight_bytes) // 2]
    assert all(abs(b - typical) <= 0.5 * typical for b in part.layer_weight_bytes)
