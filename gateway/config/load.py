"""YAML + environment + CLI flags -> one validated `GatewayConfig`, or every problem as one line each.

Precedence: CLI flags > environment > YAML > built-in defaults. Each problem line reads
`key.path (where): message`, where `where` is the YAML line, the env variable or the flag that set it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config.model import GatewayConfig, RouteError
from gateway.config.overrides import ENV_OVERRIDES, KeyPath, Override, apply_override

DEFAULT_PATHS = (Path("config/gateway.yaml"), Path("/etc/bt-gateway/gateway.yaml"))
_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


class ConfigError(Exception):
    """Invalid config: `problems` holds one human line per problem, ready to print."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


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
) -> GatewayConfig:
    """Build the effective config; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    data, lines = _read_yaml(path)
    sources: dict[KeyPath, str] = {key: f"line {line}" for key, line in lines.items()}
    overrides = [o for name, o in ENV_OVERRIDES.items() if name in env for o in [o.with_value(env[name])]]
    for override in (*overrides, *flags):
        try:
            key = apply_override(data, override)
        except ValueError as exc:
            raise ConfigError([f"{override.source}: {exc}"]) from None
        sources[key] = override.source
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_problems(exc, sources)) from None


def _read_yaml(path: Path | None) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    if path is None:
        return {}, {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"config: cannot read {str(path)!r}: {exc.strerror or exc}"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"config{where}: invalid YAML: {problem}"]) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(["config (line 1): the top level must be a mapping of keys"])
    lines: dict[KeyPath, int] = {}
    _index_lines(node, (), lines)
    return data, lines


def _index_lines(node: yaml.Node | None, key: KeyPath, out: dict[KeyPath, int]) -> None:
    """Record the line of every key and list item, so errors can point into the file."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*key, key_node.value)
            out[child] = key_node.start_mark.line + 1
            _index_lines(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*key, index)
            out[child] = item.start_mark.line + 1
            _index_lines(item, child, out)


def format_key(key: KeyPath) -> str:
    """`('routes', 1, 'upstream')` -> `routes[1].upstream`."""
    text = ""
    for part in key:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "config"


def _problems(exc: ValidationError, sources: dict[KeyPath, str]) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False):
        key: KeyPath = tuple(p for p in error["loc"] if isinstance(p, int) or "[" not in p)
        message = _MESSAGES.get(error["type"], error["msg"])
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, RouteError):
            key, message = cause.loc, cause.message
        message = message.removeprefix("Value error, ")
        source = _source_of(key, sources)
        problems.append(f"{format_key(key)}{f' ({source})' if source else ''}: {message}")
    return problems


def _source_of(key: KeyPath, sources: dict[KeyPath, str]) -> str | None:
    """Where the nearest enclosing key was set (the key itself, else its parents)."""
    for end in range(len(key), 0, -1):
        if key[:end] in sources:
            return sources[key[:end]]
    return None
