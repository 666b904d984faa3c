"""Where a model comes from: a local directory, or a Hugging Face model id.

A model id is looked up in the Hugging Face cache (HF_HOME / HF_HUB_CACHE).
Online, the files a host needs are fetched into that cache: the metadata files,
plus only the safetensors shards that hold this host's part (a worker's layers,
or the coordinator's embedding/norm/head), with retries and exponential
backoff and huggingface_hub's progress bars. Offline (HF_HUB_OFFLINE=1), the
cache is used as it is and each missing file is named.
"""

from __future__ import annotations

import json
import logging
import os
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Protocol

from mlx_cluster.models.shards import INDEX_FILE, shards_for

log = logging.getLogger(__name__)

# Everything but weights: config, tokenizer, chat template, index.
METADATA_PATTERNS = ("*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt")
RETRIES = 4
BACKOFF_S = 1.0  # doubled after each failed try


class ModelNotAvailable(FileNotFoundError):
    """The model, or some of its files, cannot be had here; the message lists them."""


class Hub(Protocol):
    """The model hub as this module uses it."""

    def list_files(self, repo: str) -> list[str]: ...
    def download(self, repo: str, filename: str) -> str: ...
    def cached(self, repo: str, filename: str) -> str | None: ...


class HuggingFaceHub:
    """huggingface_hub, with its cache and progress bars."""

    def __init__(self, cache_dir: str | None = None) -> None:
        self.cache_dir = cache_dir

    def list_files(self, repo: str) -> list[str]:
        from huggingface_hub import list_repo_files

        return list(list_repo_files(repo))

    def download(self, repo: str, filename: str) -> str:
        from huggingface_hub import hf_hub_download

        return str(hf_hub_download(repo, filename, cache_dir=self.cache_dir))

    def cached(self, repo: str, filename: str) -> str | None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename, cache_dir=self.cache_dir)
        return found if isinstance(found, str) else None


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _fetch(hub: Hub, repo: str, filename: str) -> str:
    """Download one file, retrying with exponential backoff."""
    delay = BACKOFF_S
    for attempt in range(1, RETRIES + 1):
        try:
            return hub.download(repo, filename)
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

    Args:
        ref: a model directory, or a Hugging Face model id ("org/name").
        layers: the decoder layers this host runs (a worker).
        edges: this host needs the embedding, final norm and head (the coordinator).
        hub: where model ids are looked up; default Hugging Face.
        offline: use only the cache; default from HF_HUB_OFFLINE.

    Raises:
        ModelNotAvailable: naming the model or each missing file.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if ref.count("/") != 1 or ref.startswith((".", "/", "~")):
        raise ModelNotAvailable(f"model {ref!r} is neither a directory nor a model id (org/name)")
    hub = hub or HuggingFaceHub()
    offline = is_offline() if offline is None else offline
    if offline:
        config = hub.cached(ref, "config.json")
        if config is None:
            raise ModelNotAvailable(
                f"model {ref!r} is not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
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
    snapshot = Path(_fetch(hub, ref, "config.json")).parent
    for name in metadata:
        _fetch(hub, ref, name)
    for shard in sorted(_needed_shards(snapshot, layers, edges)):
        _fetch(hub, ref, shard)
    return snapshot
