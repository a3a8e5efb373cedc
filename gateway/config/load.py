"""YAML + environment + CLI flags -> one validated `GatewayConfig`, or every problem as one line each.

Precedence: CLI flags > environment > YAML > built-in defaults. Each problem line reads
`WHERE: key.path: message`, where WHERE is `FILE:LINE` for a key set in the file, `env NAME` or
`flag --name` for an override, and the file (or `built-in defaults`) when no line can be named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.config.messages import plain_message
from gateway.config.model import GatewayConfig, KeyedError
from gateway.config.overrides import ENV_OVERRIDES, KeyPath, Override, apply_override, seed_routes
from gateway.config.yaml_source import YamlSource, read_yaml

DEFAULT_PATHS = (Path("config/gateway.yaml"), Path("/etc/bt-gateway/gateway.yaml"))
DEFAULTS = "built-in defaults"
TELEMETRY_ENV = "DISABLE_SYSADMIN_TELEMETRY"  # Braintrust's own variable
TELEMETRY_PATHS = "/brainstore/**"  # Brainstore's backfill and compaction status endpoints
BUILTIN_ROUTES = "built-in routes"


class ConfigError(Exception):
    """Invalid config: `problems` holds one human line per problem, ready to print."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class LoadedConfig:
    """A valid config and where each of its keys came from, to point at the line of a later problem."""

    config: GatewayConfig
    path: Path | None
    sources: Mapping[KeyPath, str] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        """What was loaded, for `config ok: ...` and the start-up log."""
        return str(self.path) if self.path is not None else DEFAULTS

    def problem(self, key: KeyPath, message: str) -> str:
        """One problem line for `key`, pointing where it (or its nearest parent) was set."""
        return f"{_source_of(key, self.sources, self.origin)}: {format_key(key)}: {message}"


def config_path(cli_path: str | None, env: Mapping[str, str]) -> Path | None:
    """`-c FILE`, else `$BT_GATEWAY_CONFIG`, else the first default path that exists, else None."""
    if cli_path:
        return Path(cli_path)
    if env.get("BT_GATEWAY_CONFIG"):
        return Path(env["BT_GATEWAY_CONFIG"])
    return next((p for p in DEFAULT_PATHS if p.is_file()), None)


def load_config(
    path: Path | None,
    env: Mapping[str, str] | None = None,
    flags: tuple[Override, ...] = (),
) -> LoadedConfig:
    """Build the effective config; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    source = read_yaml(path) if path is not None else YamlSource(data={}, lines={})
    origin = str(path) if path is not None else DEFAULTS
    if source.problems:
        raise ConfigError(
            [
                f"{origin}{f':{line}' if line else ''}: {format_key(key)}: {text}"
                for line, key, text in source.problems
            ]
        )
    data = source.data
    sources: dict[KeyPath, str] = {key: f"{origin}:{line}" for key, line in source.lines.items()}
    overrides = [o for name, o in ENV_OVERRIDES.items() if name in env for o in [o.with_value(env[name])]]
    if seed_routes(data, overrides):  # the file sets no routes: the built-in ones the variables name
        sources[("routes",)] = BUILTIN_ROUTES
    for override in (*overrides, *flags):
        try:
            key = apply_override(data, override)
        except ValueError as exc:
            raise ConfigError([f"{override.source}: {format_key(override.key)}: {exc}"]) from None
        sources[key] = override.source
    if env.get(TELEMETRY_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        _deny_telemetry(data, sources)
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_problems(exc, sources, origin)) from None
    return LoadedConfig(config, path, sources)


def format_key(key: KeyPath) -> str:
    """`('routes', 1, 'upstream')` -> `routes[1].upstream`."""
    text = ""
    for part in key:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "config"


def _problems(exc: ValidationError, sources: Mapping[KeyPath, str], origin: str) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False):
        key: KeyPath = tuple(error["loc"])
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, KeyedError):
            key, message = cause.loc, cause.message
        else:
            message = plain_message(error, key)
        problems.append(f"{_source_of(key, sources, origin)}: {format_key(key)}: {message}")
    return problems


def _source_of(key: KeyPath, sources: Mapping[KeyPath, str], origin: str) -> str:
    """Where the nearest enclosing key was set (the key itself, else its parents), else the file."""
    for end in range(len(key), 0, -1):
        if key[:end] in sources:
            return sources[key[:end]]
    return origin


def _deny_telemetry(data: dict[str, Any], sources: dict[KeyPath, str]) -> None:
    """Braintrust's DISABLE_SYSADMIN_TELEMETRY: the Brainstore status endpoints join `deny_paths`."""
    current = data.get("deny_paths")
    patterns = list(current) if isinstance(current, list | tuple) else []
    if TELEMETRY_PATHS not in patterns:
        data["deny_paths"] = [*patterns, TELEMETRY_PATHS]
        sources.setdefault(("deny_paths",), f"env {TELEMETRY_ENV}")
