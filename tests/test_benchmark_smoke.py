"""The pipeline benchmark runs end to end on a tiny model and writes sane results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(module: str, *args: str, timeout: float) -> None:
    """`python -m <module> <args>` from the repository root, offline; it must exit 0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    run_benchmark(
        "benchmarks.pipeline",
        "--quick",
        "--workers",
        "1,2",
        "--cache-dir",
        str(tmp_path / "models"),
        "--json",
        str(out),
        timeout=90,
    )

    results = json.loads(out.read_text())
    baseline = results["baseline"]
    pipelines = results["pipeline"]
    assert [p["workers"] for p in pipelines] == [1, 2]
    for engine in [baseline, *pipelines]:
        assert engine["decode_tokens_per_s"] > 0
        assert all(p["tokens_per_s"] > 0 and p["ttft_s"] > 0 for p in engine["prefill"])
        assert engine["tokens"][:8] == baseline["tokens"][:8]
    for p in pipelines:
        decode = p["decode"]
        assert decode["steps"] == 16 - 1  # --quick's decode tokens, the first step left out
        assert decode["wall_s"] > decode["compute_s"] > 0
        assert (decode["hops_s"] > 0) == (p["workers"] > 1)
        assert (decode["per_hop_s"] is None) == (p["workers"] == 1)
        for hops in p["prefill_hops"].values():
            assert len(hops) == p["workers"]
            assert all(h["compute_s"] > 0 and h["overhead_s"] > 0 for h in hops)
        assert all(b > 0 for b in p["memory"]["worker_peak_rss_bytes"])
        assert all(b > 0 for b in p["memory"]["worker_weight_bytes"])
    assert all(e["mean_s"] > 0 for e in results["echo"])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_batching_benchmark_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "batching.json"
    run_benchmark(
        "benchmarks.batching",
        "--model-shape",
        "tiny",
        "--dtype",
        "float32",
        "--workers",
        "2",
        "--streams",
        "4",
        "--busy-streams",
        "2",
        "--new-tokens",
        "6",
        "--prompt-tokens",
        "8",
        "--cache-dir",
        str(tmp_path / "models"),
        "--json",
        str(out),
        timeout=170,
    )

    results = json.loads(out.read_text())
    assert results["baseline"]["batch_tokens_per_s"] > 0
    (run,) = results["pipelines"]
    assert run["workers"] == 2 and run["busy_streams"] == 2
    assert run["batch_tokens_per_s"] > 0 and run["single_tokens_per_s"] > 0
    assert run["idle_ttft_s"] > 0 and run["busy_ttft_s"] > 0
    assert run["largest_batch"] >= 2, "the 4 streams never decoded together"
    assert run["step_ms"]["wall"] >= run["step_ms"]["hops"] > 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_speculative_benchmark_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "speculative.json"
    run_benchmark(
        "benchmarks.speculative",
        "--quick",
        "--cache-dir",
        str(tmp_path / "models"),
        "--json",
        str(out),
        timeout=90,
    )

    results = json.loads(out.read_text())
    assert [row["workload"] for row in results["summary"]] == ["copy", "no copy"]
    for row in results["summary"]:
        assert row["mlx_lm_tokens_per_s"] > 0 and row["pipeline_tokens_per_s"] > 0
        (spec,) = row["speculative"]  # --quick's one draft count
        assert spec["num_draft_tokens"] == 4 and spec["tokens_per_s"] > 0
        assert spec["tokens_equal"], spec
        assert 0 <= spec["accepted"] <= spec["drafted"]
        assert 0 < spec["traversals"] <= spec["completion_tokens"] <= 24  # --quick's max tokens
    copy = results["summary"][0]["speculative"][0]
    assert copy["drafted"] > 0  # the copy prompt always has something to look up
    for m in results["measurements"]:
        assert m["samples"] and all(s["tokens"] for s in m["samples"])
        if m["engine"] == "pipeline" and m["num_draft_tokens"] == 0:
            assert all(s["drafted"] == 0 for s in m["samples"])
            assert all(s["traversals"] == len(s["tokens"]) for s in m["samples"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_speculative_benchmark_drafts_with_a_draft_model(tmp_path: Path) -> None:
    """The quick target drafting with itself: its drafts are the tokens it samples."""
    out = tmp_path / "speculative.json"
    run_benchmark(
        "benchmarks.speculative",
        "--quick",
        "--draft-model",
        "tiny",
        "--cache-dir",
        str(tmp_path / "models"),
        "--json",
        str(out),
        timeout=90,
    )

    results = json.loads(out.read_text())
    assert results["draft_model"]["arg"] == "tiny"
    for row in results["summary"]:
        lookup, draft = row["speculative"]
        assert (lookup["method"], draft["method"]) == ("prompt_lookup", "draft")
        assert draft["num_draft_tokens"] == 4 and draft["tokens_equal"], draft
        assert 0 <= draft["accepted"] <= draft["drafted"]
    copy = results["summary"][0]["speculative"][1]
    assert copy["drafted"] > 0 and copy["accepted"] >= 0.9 * copy["drafted"], copy
    labels = {m["label"] for m in results["measurements"]}
    assert {"pipeline lookup k=4", "pipeline draft k=4"} <= labels


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_speculative_benchmark_copies_with_a_successor_model(tmp_path: Path) -> None:
    """The quick model made to count (t -> t + 1) copies the run in its prompt: most
    drafts kept, the same tokens as without drafts; whole-buffer verification as on CUDA."""
    out = tmp_path / "speculative.json"
    run_benchmark(
        "benchmarks.speculative",
        "--quick",
        "--successor",
        "--ignore-eos",
        "--short-step-attention",
        "whole_buffer",
        "--cache-dir",
        str(tmp_path / "models"),
        "--json",
        str(out),
        timeout=90,
    )

    results = json.loads(out.read_text())
    assert results["short_step_attention"] == "whole_buffer"
    copy, no_copy = (row["speculative"][0] for row in results["summary"])
    assert copy["tokens_equal"] and no_copy["tokens_equal"]
    assert copy["drafted"] > 0 and copy["accepted"] >= 0.6 * copy["drafted"], copy
    (reference,) = (
        m for m in results["measurements"] if m["engine"] == "mlx-lm" and m["workload"] == "copy"
    )
    tokens = reference["samples"][0]["tokens"]
    assert tokens == list(range(tokens[0], tokens[0] + len(tokens)))  # it counts


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_prefix_cache_benchmark_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "prefix_cache.json"
    run_benchmark(
        "benchmarks.prefix_cache",
        "--model-shape",
        "tiny",
        "--dtype",
        "float32",
        "--prompt-tokens",
        "300",
        "--max-tokens",
        "8",
        "--cache-dir",
        str(tmp_path / "models"),
        "--json",
        str(out),
        timeout=90,
    )

    results = json.loads(out.read_text())
    cached, plain = results["runs"]
    assert cached["prefix_cache_gb"] > 0 and plain["prefix_cache_gb"] == 0
    turn1 = cached["turn1"]["prompt_tokens"]
    assert turn1 >= 300 and cached["turn2"]["cached_tokens"] >= turn1 - 1
    assert plain["turn2"]["cached_tokens"] == 0
    assert results["turn2_tokens_equal"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_grammar_benchmark_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "grammar.json"
    run_benchmark(
        "benchmarks.grammar",
        *("--vocab", "4000", "--documents", "2", "--engines", "llguidance"),
        *("--json", str(out)),
        timeout=90,
    )

    (result,) = json.loads(out.read_text())["results"]
    assert result["engine"] == "llguidance" and result["tokens"] > 50
    assert 0 < result["mask_us_median"] <= result["total_us_median"] <= result["total_us_p99"]
