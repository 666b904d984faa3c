"""The cluster configuration: validation messages, precedence of sources, examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mlx_cluster.contract.config import ConfigError
from mlx_cluster.contract.config_loader import LoadedConfig, load_config, render_config

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = "model: /models/m\nworkers:\n  - address: a:50051\n  - address: b:50051\n"


def load(
    tmp_path: Path,
    text: str = MINIMAL,
    env: dict[str, str] | None = None,
    dotenv: str | None = None,
    cli: dict[str, Any] | None = None,
) -> LoadedConfig:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    env_file = tmp_path / ".env"
    if dotenv is not None:
        env_file.write_text(dotenv)
    return load_config(path, env=env or {}, dotenv=env_file, cli=cli)


def error_of(tmp_path: Path, text: str, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, **kwargs)
    return str(info.value)


# --- examples and defaults ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["cluster.yaml", "single-host.yaml"])
def test_shipped_examples_validate(name):
    config = load_config(ROOT / "config" / name, env={}, dotenv=None).config
    assert config.workers and config.model


def test_three_host_example_describes_the_uneven_cluster():
    config = load_config(ROOT / "config" / "cluster.yaml", env={}, dotenv=None).config
    assert [w.memory_gb for w in config.workers] == [48, 12, 12]
    assert config.coordinator.http_listen.split(":")[0] not in {
        w.address.split(":")[0] for w in config.workers
    }


def test_defaults(tmp_path):
    loaded = load(tmp_path)
    config = loaded.config
    assert config.coordinator.http_listen == "127.0.0.1:8100"
    assert config.kv.memory_fraction == 0.5 and config.reserve_gb == 1.0
    assert config.limits.default_max_tokens == 256 and config.limits.max_tokens_ceiling == 4096
    assert config.workers[1].label == "b:50051"
    assert loaded.sources["model"] == f"file:{tmp_path / 'cluster.yaml'}"
    assert loaded.sources["kv.max_session_tokens"] == "default"


def test_worker_shorthand(tmp_path):
    config = load(tmp_path, "model: m\nworkers: ['h1:1', {address: 'h2:2', name: two}]\n").config
    assert [(w.address, w.name) for w in config.workers] == [("h1:1", None), ("h2:2", "two")]


# --- validation messages ------------------------------------------------------------------

WORKERS_2 = "model: m\nworkers:\n  - {address: 'a:1'%s}\n  - {address: 'b:1'%s}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model: m\nworkers: ['nohost']\n",
            "workers[0].address: expected HOST:PORT with port 1-65535, got 'nohost'",
        ),
        (
            "model: m\nworkers: ['a:70000']\n",
            "workers[0].address: expected HOST:PORT with port 1-65535, got 'a:70000'",
        ),
        ("model: m\nworkers: [':80']\n", "workers[0].address: expected HOST:PORT"),
        ("model: m\nworkers: ['a:0']\n", "got 'a:0'"),
        (
            "model: m\nworkers: ['a:1']\ncoordinator: {http_listen: 'localhost'}\n",
            "coordinator.http_listen: expected HOST:PORT with port 0-65535, got 'localhost'",
        ),
        (
            WORKERS_2 % (", layers: [0, 4]", ""),
            "workers: either every worker gives layers or none does; workers [0] do, [1] do not",
        ),
        (
            WORKERS_2 % (", layers: [0, 4]", ", layers: [3, 8]"),
            "workers: workers[1].layers [3, 8) overlaps the layers before it, which end at 4",
        ),
        (
            WORKERS_2 % (", layers: [0, 4]", ", layers: [5, 8]"),
            "workers[1].layers [5, 8) leaves a gap: layers [4, 5) belong to no worker",
        ),
        (
            WORKERS_2 % (", layers: [2, 4]", ", layers: [4, 8]"),
            "workers[0].layers [2, 4) leaves a gap: layers [0, 2) belong to no worker",
        ),
        (
            WORKERS_2 % (", layers: [4, 2]", ""),
            "workers[0].layers: expected [start, end) with 0 <= start < end, got [4, 2]",
        ),
        (
            "model: m\nworkers: ['a:1', 'a:1']\n",
            "workers: each worker needs its own address, ['a:1'] appear twice",
        ),
        (
            WORKERS_2 % (", name: x", ", name: x"),
            "workers: each worker needs its own name, ['x'] appear twice",
        ),
        (
            "model: m\nworkers: ['a:1']\nlimits: {default_max_tokens: 5000}\n",
            "limits: default_max_tokens (5000) must not exceed max_tokens_ceiling (4096)",
        ),
        (
            "model: m\nworkers: ['a:1']\nkv: {memory_fraction: 1.5}\n",
            "kv.memory_fraction: Input should be less than or equal to 1 (got 1.5",
        ),
        (
            "model: m\nworkers: ['a:1']\nkv: {memory_fraction: 0}\n",
            "kv.memory_fraction: Input should be greater than 0 (got 0",
        ),
        (
            "model: m\nworkers: ['a:1']\nkv: {max_session_tokens: lots}\n",
            "kv.max_session_tokens: Input should be a valid integer, unable to parse string "
            "as an integer (got 'lots'",
        ),
        (
            "model: m\nworkers: [{address: 'a:1', memory_gb: -4}]\n",
            "workers[0].memory_gb: Input should be greater than 0 (got -4",
        ),
        (
            "model: m\nworkers: ['a:1']\nreserve_gb: -1\n",
            "reserve_gb: Input should be greater than or equal to 0 (got -1",
        ),
        (
            "model: m\nworkers: ['a:1']\nlogging: {level: LOUD}\n",
            "logging.level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'",
        ),
        (
            "model: m\nworkers: ['a:1']\nlogging: {format: xml}\n",
            "logging.format: Input should be 'text' or 'json' (got 'xml'",
        ),
        (
            "model: m\nworkers: ['a:1']\nkv: {max_tokens: 5}\n",
            "kv.max_tokens: unknown setting; expected one of: max_session_tokens, "
            "max_sequence_length, memory_gb, memory_fraction, session_ttl_s, budget_tokens, "
            "prefix_cache_gb (got 5",
        ),
        (
            "model: m\nworkers: ['a:1']\nbatching: {max_batchh: 8}\n",
            "batching.max_batchh: unknown setting; expected one of: enabled, max_batch, "
            "micro_batches, prefill_chunk (got 8",
        ),
        (
            "model: m\nworkers: ['a:1']\nstandby: [{address: 'b:1', adress: 'c:1'}]\n",
            "standby[0].adress: unknown setting; expected one of: address, name, layers, "
            "memory_gb, compute (got 'c:1'",
        ),
        (
            "modle: m\nworkers: ['a:1']\n",
            "modle: unknown setting; expected one of: model, coordinator, workers",
        ),
        ("workers: ['a:1']\n", "model: Field required"),
        ("model: m\nworkers: []\n", "workers: list at least one worker, or give `workers: auto`"),
        (
            "model: m\nworkers: auto\nweights: {chunk_kb: 4096}\nlimits: {max_message_mb: 4}\n",
            "weights.chunk_kb (4096 KiB) plus 1 MiB must fit in limits.max_message_mb (4 MiB)",
        ),
    ],
)
def test_validation_messages_name_field_and_value(tmp_path, text, message):
    assert message in error_of(tmp_path, text)


def test_every_problem_is_listed_with_its_source(tmp_path):
    text = "model: m\nworkers: ['a:1']\nkv: {memory_fraction: 2}\nlogging: {format: xml}\n"
    message = error_of(tmp_path, text, env={"MLX_CLUSTER_LIMITS__REQUEST_TIMEOUT_S": "soon"})
    lines = message.splitlines()
    assert lines[0] == "invalid configuration (3 problem(s)):"
    assert f"from file:{tmp_path / 'cluster.yaml'}" in lines[1]
    assert "limits.request_timeout_s" in lines[2]
    assert "got 'soon', from env:MLX_CLUSTER_LIMITS__REQUEST_TIMEOUT_S" in lines[2]


def test_misspelt_environment_variable_is_an_error(tmp_path):
    message = error_of(tmp_path, MINIMAL, env={"MLX_CLUSTER_KV__MAX_TOKENS": "5"})
    assert "kv.max_tokens: unknown setting" in message
    assert "from env:MLX_CLUSTER_KV__MAX_TOKENS" in message


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    message = error_of(tmp_path, "model: m\nworkers:\n  - address: [a\nkv: {}\n")
    assert message.startswith(f"{tmp_path / 'cluster.yaml'}:4: not valid YAML")


def test_yaml_must_be_a_mapping(tmp_path):
    assert "expected a mapping of settings, got list" in error_of(tmp_path, "- a\n- b\n")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml", env={}, dotenv=None)


# --- precedence: defaults < file < .env < environment < CLI ---------------------------------


def test_each_source_overrides_the_one_below(tmp_path):
    text = MINIMAL + "kv: {max_session_tokens: 1000, session_ttl_s: 10}\nreserve_gb: 2\n"
    dotenv = "MLX_CLUSTER_KV__MAX_SESSION_TOKENS=2000\nMLX_CLUSTER_RESERVE_GB=3\n"
    env = {"MLX_CLUSTER_KV__MAX_SESSION_TOKENS": "3000", "UNRELATED": "x"}
    loaded = load(tmp_path, text, env=env, dotenv=dotenv, cli={"kv.session_ttl_s": 20})
    config, sources = loaded.config, loaded.sources
    assert config.kv.max_session_tokens == 3000
    assert sources["kv.max_session_tokens"] == "env:MLX_CLUSTER_KV__MAX_SESSION_TOKENS"
    assert (config.reserve_gb, sources["reserve_gb"]) == (3.0, ".env")
    assert (config.kv.session_ttl_s, sources["kv.session_ttl_s"]) == (20.0, "cli")
    assert sources["kv.memory_fraction"] == "default"
    assert sources["model"] == f"file:{tmp_path / 'cluster.yaml'}"


def test_cli_beats_environment(tmp_path):
    env = {"MLX_CLUSTER_MODEL": "/from/env"}
    loaded = load(tmp_path, env=env, cli={"model": "/from/cli", "reserve_gb": None})
    assert (loaded.config.model, loaded.sources["model"]) == ("/from/cli", "cli")
    assert loaded.sources["reserve_gb"] == "default"  # None: flag not given


def test_environment_alone_is_enough(tmp_path):
    env = {"MLX_CLUSTER_MODEL": "/models/x", "MLX_CLUSTER_WORKERS": "h1:50051, h2:50051"}
    loaded = load_config(None, env=env, dotenv=tmp_path / "missing.env")
    assert [w.address for w in loaded.config.workers] == ["h1:50051", "h2:50051"]
    assert loaded.sources["workers"] == "env:MLX_CLUSTER_WORKERS"


def test_list_from_environment_replaces_the_file_list(tmp_path):
    text = MINIMAL + "coordinator: {cors_origins: ['http://a']}\n"
    env = {
        "MLX_CLUSTER_WORKERS": "c:1",
        "MLX_CLUSTER_COORDINATOR__CORS_ORIGINS": "http://x,http://y",
    }
    config = load(tmp_path, text, env=env).config
    assert [w.address for w in config.workers] == ["c:1"]
    assert config.coordinator.cors_origins == ["http://x", "http://y"]


def test_dotenv_is_skipped_when_none(tmp_path):
    (tmp_path / ".env").write_text("MLX_CLUSTER_RESERVE_GB=9\n")
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL)
    assert load_config(path, env={}, dotenv=None).config.reserve_gb == 1.0
    assert load_config(path, env={}, dotenv=tmp_path / ".env").config.reserve_gb == 9.0


def test_render_config_shows_values_and_sources(tmp_path):
    loaded = load(tmp_path, env={"MLX_CLUSTER_LOGGING__LEVEL": "debug"}, cli={"reserve_gb": 4})
    text = render_config(loaded)
    assert f"model: /models/m  # file:{tmp_path / 'cluster.yaml'}" in text
    assert "  level: DEBUG  # env:MLX_CLUSTER_LOGGING__LEVEL" in text
    assert "reserve_gb: 4.0  # cli" in text
    assert "  max_prompt_tokens: null  # default" in text
    assert "  - address: a:50051" in text


def test_tool_variables_are_not_settings(tmp_path):
    from mlx_cluster.contract.config_loader import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model: /m\nworkers: [127.0.0.1:50051]\n")
    env = {"MLX_CLUSTER_HOME": "/cache", "MLX_CLUSTER_RUN_DIR": "/run"}
    assert load_config(path, env=env, dotenv=None).config.model == "/m"


def test_workers_auto_turns_discovery_and_sent_weights_on(tmp_path):
    config = load(tmp_path, "model: m\nworkers: auto\ndiscovery: {expected_workers: 2}\n").config
    assert config.workers == [] and config.discovery.enabled
    assert config.discovery.expected_workers == 2 and config.sends_weights
    listed = load(tmp_path, MINIMAL).config
    assert not listed.discovery.enabled and not listed.sends_weights
