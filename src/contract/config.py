"""The cluster configuration: its schema, and the one loader that merges its sources.

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
from typing import Any, Literal, get_args

import yaml
from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "MLX_CLUSTER_"
# Variables with our prefix that belong to the tools, not to the cluster's settings.
TOOL_ENV = frozenset(
    f"{ENV_PREFIX}{name}"
    for name in ("HOME", "RUN_DIR", "PYTHON", "URL", "WORKER_LISTEN", "WORKER_NAME")
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Settings whose values are never printed (`config show`, validation errors).
SECRET_FIELDS = frozenset({"auth.token", "auth.api_keys"})


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem, one per line."""


# --- schema ----------------------------------------------------------------------------


def check_address(value: str, *, allow_port_zero: bool = False, allow_unix: bool = False) -> str:
    """Return `value` if it is HOST:PORT (IPv6 hosts in brackets), else raise ValueError.

    With `allow_unix`, a Unix domain socket address unix:PATH is accepted too.
    """
    if allow_unix and value.startswith("unix:"):
        if len(value) == len("unix:"):
            raise ValueError(f"expected unix:PATH with a socket path, got {value!r}")
        return value
    low = 0 if allow_port_zero else 1
    host, _, port = value.rpartition(":")
    if host.strip("[]") == "" or not port.isdigit() or not low <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with port {low}-65535, got {value!r}")
    return value


def _split_commas(value: Any) -> Any:
    """Lists from the environment or the CLI come as "a,b,c"."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class CoordinatorConfig(_Strict):
    """Where the coordinator serves HTTP."""

    http_listen: str = "127.0.0.1:8100"  # HOST:PORT of the OpenAI-style HTTP API (port 0: any)
    cors_origins: list[str] = []  # origins browsers may call the API from
    shutdown_grace_s: float = Field(default=30.0, ge=0)  # on SIGTERM, in-flight requests get this

    @field_validator("http_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return check_address(value, allow_port_zero=True)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        return _split_commas(value)


class WorkerEntry(_Strict):
    """One worker, in chain order."""

    address: str  # HOST:PORT of its gRPC server (or unix:PATH on the coordinator's host)
    name: str | None = None  # shown in plans and logs; default: the address
    layers: tuple[int, int] | None = None  # manual half-open range [start, end)
    memory_gb: float | None = Field(default=None, gt=0)  # memory to use, instead of detected
    compute: float | None = Field(default=None, gt=0)  # relative compute weight override

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_address(value, allow_unix=True)

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 0 <= value[0] < value[1]:
            raise ValueError(f"expected [start, end) with 0 <= start < end, got {list(value)}")
        return value

    @property
    def label(self) -> str:
        return self.name or self.address


class KVConfig(_Strict):
    """How much KV cache the workers keep."""

    max_session_tokens: int = Field(default=8192, gt=0)  # longest session (prompt + output)
    max_sequence_length: int | None = Field(default=None, gt=0)  # None = the model's context
    memory_gb: float | None = Field(default=None, gt=0)  # KV memory per worker, over fraction
    memory_fraction: float = Field(default=0.5, gt=0, le=1)  # of free memory after weights
    session_ttl_s: float = Field(default=600.0, gt=0)  # idle sessions are dropped after this
    budget_tokens: int | None = Field(default=None, gt=0)  # each worker's KV; None: from memory


class LimitsConfig(_Strict):
    """What one request may ask for."""

    max_prompt_bytes: int = Field(default=1_048_576, gt=0)  # UTF-8 bytes of the prompt
    max_prompt_tokens: int | None = Field(default=None, gt=0)  # None = the cluster's context
    default_max_tokens: int = Field(default=256, gt=0)  # when a request gives no max_tokens
    max_tokens_ceiling: int = Field(default=4096, gt=0)  # the most a request may ask for
    request_timeout_s: float = Field(default=300.0, gt=0)  # a request is cancelled after this
    queue_length: int = Field(default=16, ge=0)  # requests that may wait for KV room; then 429
    queue_timeout_s: float = Field(default=30.0, ge=0)  # longest wait for KV room; then 429
    max_message_mb: int = Field(default=256, ge=1, le=2047)  # largest gRPC message to workers

    @model_validator(mode="after")
    def _defaults_below_ceiling(self) -> LimitsConfig:
        if self.default_max_tokens > self.max_tokens_ceiling:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must not exceed "
                f"max_tokens_ceiling ({self.max_tokens_ceiling})"
            )
        return self


class BatchingConfig(_Strict):
    """Continuous batching: requests decode together in micro-batches that keep stages busy."""

    enabled: bool = True  # off: every request steps alone
    max_batch: int = Field(default=32, ge=1, le=256)  # requests decoding at once; more wait
    micro_batches: int = Field(default=0, ge=0, le=64)  # decode lanes; 0 = one per worker
    prefill_chunk: int = Field(default=512, ge=1)  # prompt tokens per prefill step


class LoggingConfig(_Strict):
    """Where and how processes log."""

    level: str = "INFO"  # one of DEBUG, INFO, WARNING, ERROR, CRITICAL
    format: Literal["text", "json"] = "text"  # json: one object per line
    file: str | None = None  # also log to this file

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return value.upper()


class AuthConfig(_Strict):
    """Credentials: the token and TLS towards workers, API keys on the HTTP API."""

    token: str | None = Field(default=None, min_length=1)  # the workers' shared cluster token
    token_file: str | None = None  # or a file holding it (instead of token)
    tls_cert: str | None = None  # client certificate (PEM) for workers that require mutual TLS
    tls_key: str | None = None  # the private key of tls_cert
    tls_ca: str | None = None  # CA (PEM) that signed the workers' certificates; turns TLS on
    tls_server_name: str | None = None  # name in the workers' certificates, if not their host
    api_keys: list[str] = []  # keys HTTP clients must send as `Authorization: Bearer KEY`
    api_keys_file: str | None = None  # or a file of keys, one a line (added to api_keys)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        return _split_commas(value)

    @model_validator(mode="after")
    def _pairs(self) -> AuthConfig:
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        return self


class ClusterConfig(_Strict):
    """Everything a cluster needs, from one file (plus overrides)."""

    model: str = Field(min_length=1)  # local model directory or Hugging Face model id
    coordinator: CoordinatorConfig = Field(default_factory=CoordinatorConfig)  # the HTTP side
    workers: list[WorkerEntry] = Field(min_length=1)  # in chain order: first runs layer 0
    standby: list[WorkerEntry] = []  # spare workers that take over a failed worker's layers
    kv: KVConfig = Field(default_factory=KVConfig)  # KV cache sizing
    limits: LimitsConfig = Field(default_factory=LimitsConfig)  # per-request limits
    batching: BatchingConfig = Field(default_factory=BatchingConfig)  # continuous batching
    logging: LoggingConfig = Field(default_factory=LoggingConfig)  # level, format, file
    auth: AuthConfig = Field(default_factory=AuthConfig)  # cluster token, TLS, HTTP API keys
    reserve_gb: float = Field(default=1.0, ge=0)  # memory left free on every worker

    @field_validator("workers", "standby", mode="before")
    @classmethod
    def _worker_shorthand(cls, value: Any) -> Any:
        value = _split_commas(value)
        if isinstance(value, list):
            return [{"address": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("workers")
    @classmethod
    def _workers(cls, workers: list[WorkerEntry]) -> list[WorkerEntry]:
        for attr in ("address", "name"):
            values = [getattr(w, attr) for w in workers if getattr(w, attr) is not None]
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"each worker needs its own {attr}, {dupes} appear twice")
        _check_manual_layers(workers)
        return workers

    @model_validator(mode="after")
    def _standby_apart(self) -> ClusterConfig:
        active = {w.address for w in self.workers}
        shared = sorted(active & {w.address for w in self.standby})
        if shared:
            raise ValueError(f"standby workers must not also be active workers: {shared}")
        return self


def _check_manual_layers(workers: list[WorkerEntry]) -> None:
    given = [i for i, w in enumerate(workers) if w.layers is not None]
    if not given:
        return
    if len(given) != len(workers):
        missing = [i for i, w in enumerate(workers) if w.layers is None]
        raise ValueError(
            f"either every worker gives layers or none does; workers {given} do, {missing} do not"
        )
    expected = 0
    for i, w in enumerate(workers):
        start, end = w.layers or (0, 0)
        if start < expected:
            raise ValueError(
                f"workers[{i}].layers [{start}, {end}) overlaps the layers before it, "
                f"which end at {expected}"
            )
        if start > expected:
            raise ValueError(
                f"workers[{i}].layers [{start}, {end}) leaves a gap: layers "
                f"[{expected}, {start}) belong to no worker"
            )
        expected = end


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
