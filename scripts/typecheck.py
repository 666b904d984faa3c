"""Type-check the mlx_cluster package with mypy, as it is installed.

Usage: python scripts/typecheck.py [MYPY_ARGS...]

The package's parts keep their own folders under src/ (pyproject's
`[tool.setuptools.package-dir]`), which mypy cannot map to module names. This
builds the installed layout as links under build/typecheck/, runs mypy on the
package there, and prints each error with the file's path under src/.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"
PACKAGE = "mlx_cluster"


def package_dirs() -> dict[str, Path]:
    """Each mapped package's folder, from pyproject.toml: {"mlx_cluster.worker": src/worker}."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()}


def build_tree() -> dict[Path, Path]:
    """Link every mapped folder into the installed layout; returns {link: real folder}."""
    shutil.rmtree(TREE, ignore_errors=True)
    links: dict[Path, Path] = {}
    dirs = package_dirs()
    root = TREE / PACKAGE
    root.mkdir(parents=True)
    for entry in dirs.pop(PACKAGE).iterdir():  # the top package: its own files, linked
        wanted = entry.suffix in (".py", ".pyi", ".typed") or entry.is_dir()
        if wanted and entry.name != "__pycache__":
            (root / entry.name).symlink_to(entry)
    links[root] = ROOT / "src" / PACKAGE
    for name, folder in dirs.items():
        link = TREE / Path(*name.split("."))
        link.symlink_to(folder, target_is_directory=True)
        links[link] = folder
    return links


def main(argv: list[str]) -> int:
    links = build_tree()
    stdout, stderr, code = api.run(["--config-file", str(ROOT / "pyproject.toml"), *argv])
    for link, real in sorted(links.items(), key=lambda item: -len(str(item[0]))):
        stdout = stdout.replace(str(link.relative_to(ROOT)), str(real.relative_to(ROOT)))
    sys.stdout.write(stdout)
    sys.stderr.write(stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
