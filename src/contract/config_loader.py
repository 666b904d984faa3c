"""Load the cluster configuration: merge its sources, validate once, say where values came from.

Precedence, lowest first: defaults < YAML file < .env file < environment < CLI flags.
Environment names are `MLX_CLUSTER_<FIELD>` or `MLX_CLUSTER_<SECTION>__<FIELD>`
(e.g. `MLX_CLUSTER_MODEL`, `MLX_CLUSTER_KV__MAX_SESSION_TOKENS`); list settings take
commas (`MLX_CLUSTER_WORKERS=host1:50051,host2:50051`). Every `MLX_CLUSTER_*` name is
a setting, so a misspelt one is an error rather than silently ignored, except
the tools' own variables in TOOL_ENV (model cache home, launcher settings).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import yaml
from dotenv import dotenv_values
from pydantic import BaseModel, ValidationError

from mlx_cluster.contract.config import (
    ENV_PREFIX,
    SECRET_FIELDS,
    TOOL_ENV,
    ClusterConfig,
    ConfigError,
)

# --- loading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedConfig:
    """A validated configuration and where each value came from."""

    config: ClusterConfig
    # dotted field -> "default" | "file:<path>" | ".env" | "env:<NAME>" | "cli"
    sources: dict[str, str]


def _set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        node = tree.get(key)
        if not isinstance(node, dict):
            node = tree[key] = {}
        tree = node
    tree[path[-1]] = value


def _leaf_paths(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the values in a nested mapping; a list counts as one value."""
    out: list[str] = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.extend(_leaf_paths(value, f"{prefix}{key}."))
        else:
            out.append(f"{prefix}{key}")
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _env_layer(env: Mapping[str, str | None]) -> dict[str, list[str]]:
    """MLX_CLUSTER_A__B=v -> {"MLX_CLUSTER_A__B": ["a", "b"]}, for the variables with our prefix."""
    paths = {}
    for name in sorted(env):
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper not in TOOL_ENV and env[name] is not None:
            paths[name] = name[len(ENV_PREFIX) :].lower().split("__")
    return paths


def load_config(
    path: Path | None,
    env: Mapping[str, str] | None = None,
    dotenv: Path | None = Path(".env"),
    cli: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """Merge defaults, the YAML file, .env, the environment and CLI flags; validate once.

    Args:
        path: YAML file, or None for none.
        env: Environment variables; default `os.environ`.
        dotenv: A .env file read if it exists; None to skip.
        cli: Overrides as dotted keys, e.g. {"kv.max_session_tokens": 4096}; None values
            (flags not given) are skipped.

    Raises:
        ConfigError: unreadable or invalid YAML (with file and line), or values that do
            not validate (every problem, each naming the field, the value and its source).
    """
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        tree = _read_yaml(path)
        sources.update(dict.fromkeys(_leaf_paths(tree), f"file:{path}"))
    layers: list[tuple[Mapping[str, str | None], str | None]] = []
    if dotenv is not None and dotenv.is_file():
        layers.append((dotenv_values(dotenv), ".env"))
    layers.append((os.environ if env is None else env, None))
    for variables, label in layers:
        for name, keys in _env_layer(variables).items():
            _set(tree, keys, variables[name])
            _drop_below(sources, ".".join(keys))
            sources[".".join(keys)] = label or f"env:{name}"
    for dotted, value in (cli or {}).items():
        if value is not None:
            _set(tree, dotted.split("."), value)
            _drop_below(sources, dotted)
            sources[dotted] = "cli"
    try:
        config = ClusterConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources)) from exc
    return LoadedConfig(config, _with_defaults(config, sources))


def _drop_below(sources: dict[str, str], dotted: str) -> None:
    """A value set at `dotted` replaces whatever was set inside it."""
    for key in [k for k in sources if k.startswith(dotted + ".")]:
        del sources[key]


def _with_defaults(config: ClusterConfig, sources: dict[str, str]) -> dict[str, str]:
    """Every leaf of the config, with its source ("default" when nobody set it)."""
    out = {}
    for dotted in _leaf_paths(config.model_dump()):
        prefixes = [".".join(dotted.split(".")[: i + 1]) for i in range(dotted.count(".") + 1)]
        out[dotted] = next((sources[p] for p in reversed(prefixes) if p in sources), "default")
    return out


def _dotted(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _describe(exc: ValidationError, sources: Mapping[str, str]) -> str:
    """One line per problem: `field: message (got value, from source)`."""
    lines = [f"invalid configuration ({exc.error_count()} problem(s)):"]
    for error in exc.errors():
        loc = tuple(error["loc"])
        field = _dotted(loc)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown setting; {_allowed(loc)}"
        details = []
        value = error.get("input")
        shown = "got " in message or isinstance(value, dict | list)  # ours name the value
        plain = ".".join(str(p) for p in loc if isinstance(p, str))
        if error["type"] != "missing" and not shown and plain not in SECRET_FIELDS:
            details.append(f"got {value!r}")
        source = next((sources[p] for p in _prefixes(plain) if p in sources), None)
        if source is not None:
            details.append(f"from {source}")
        suffix = f" ({', '.join(details)})" if details else ""
        lines.append(f"  {field}: {message}{suffix}")
    return "\n".join(lines)


def _allowed(loc: tuple[int | str, ...]) -> str:
    """The settings allowed next to the unknown one at `loc`, read from the schema."""
    model: type[BaseModel] = ClusterConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # an index into a list of sections, e.g. workers[0]
        field = model.model_fields.get(part)
        nested = _section_model(field.annotation) if field is not None else None
        if nested is None:
            break
        model = nested
    return "expected one of: " + ", ".join(model.model_fields)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, directly or inside list[...], X | None and the like."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def _prefixes(dotted: str) -> list[str]:
    """The dotted path and its parents: a.b.c -> [a.b.c, a.b, a]."""
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


# --- showing ---------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        special = ": " in value or " #" in value or value.strip() != value
        keyword = value.lower() in ("", "null", "true", "false", "~", "yes", "no")
        if special or keyword or value[:1] in "[]{}#&*!|>'\"%@`,-?" or _is_number(value):
            return json.dumps(value)
        return value
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    return json.dumps(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def render_config(loaded: LoadedConfig) -> str:
    """The effective configuration as YAML-like lines, `key: value  # source`."""
    data = loaded.config.model_dump()
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            for sub, item in value.items():
                dotted = f"{key}.{sub}"
                shown = "<hidden>" if dotted in SECRET_FIELDS and item else _scalar(item)
                lines.append(f"  {sub}: {shown}  # {loaded.sources[dotted]}")
        elif key == "workers":
            lines.append(f"workers:  # {loaded.sources['workers']}")
            for worker in value:
                fields = [f"{k}: {_scalar(v)}" for k, v in worker.items() if v is not None]
                lines.append("  - " + "\n    ".join(fields))
        else:
            lines.append(f"{key}: {_scalar(value)}  # {loaded.sources[key]}")
    return "\n".join(lines)
