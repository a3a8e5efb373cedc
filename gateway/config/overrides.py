"""Environment variables and CLI flags that override single config keys.

Braintrust's own names are kept where one exists (BRAINTRUST_APP_URL, BRAINTRUST_APP_PUBLIC_URL, ...), so an
operator who read Braintrust's self-hosting docs already knows how to drive the gateway; the rest are
`BT_GATEWAY_<SECTION>_<KEY>`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from gateway.config.model import default_routes

KeyPath = tuple[str | int, ...]
APP_ROUTE = "app"
DATA_ROUTE = "data"


@dataclass(frozen=True, slots=True)
class Override:
    """Set `key` to `value`; `source` says who asked (shown in error lines). `split` makes a comma list."""

    key: tuple[str, ...]
    source: str
    value: Any = None
    split: bool = False

    def with_value(self, value: Any) -> Override:
        if self.split and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return replace(self, value=value)


def _env(name: str, *key: str, split: bool = False) -> tuple[str, Override]:
    return name, Override(key=key, source=f"env {name}", split=split)


ENV_OVERRIDES: dict[str, Override] = dict(
    [
        _env("BRAINTRUST_APP_URL", "routes", APP_ROUTE, "upstream"),
        # A self-hosted data plane from the environment alone: the login's api_url then comes back through
        # the gateway (an env-only deployment would otherwise send every /v1 and /logs3 call around it).
        _env("BT_GATEWAY_DATA_PLANE_URL", "routes", DATA_ROUTE, "upstream"),
        _env("BRAINTRUST_APP_PUBLIC_URL", "public_url"),
        _env("OUTBOUND_RATE_LIMIT_MAX_REQUESTS", "rate_limit", "max_requests"),
        _env("OUTBOUND_RATE_LIMIT_WINDOW_MINUTES", "rate_limit", "window_minutes"),
        _env("BT_GATEWAY_RATE_LIMIT_STORAGE", "rate_limit", "storage"),
        _env("BT_GATEWAY_RATE_LIMIT_STRATEGY", "rate_limit", "strategy"),
        _env("BT_GATEWAY_RATE_LIMIT_ON_STORAGE_ERROR", "rate_limit", "on_storage_error"),
        _env("BT_GATEWAY_RATE_LIMIT_STORAGE_PASSWORD", "rate_limit", "storage_password"),
        _env("BT_GATEWAY_RATE_LIMIT_STORAGE_PASSWORD_FILE", "rate_limit", "storage_password_file"),
        _env("BT_GATEWAY_RATE_LIMIT_STORAGE_CA_BUNDLE", "rate_limit", "storage_ca_bundle"),
        _env("BT_GATEWAY_ADVERTISE_URL", "advertise_url"),
        _env("BT_GATEWAY_LISTEN_HOST", "listen", "host"),
        _env("BT_GATEWAY_LISTEN_PORT", "listen", "port"),
        _env("BT_GATEWAY_ADMIN_HOST", "admin", "host"),
        _env("BT_GATEWAY_ADMIN_PORT", "admin", "port"),
        _env("BT_GATEWAY_ADMIN_TOKEN", "admin", "token"),
        _env("BT_GATEWAY_ADMIN_TOKEN_FILE", "admin", "token_file"),
        _env("BT_GATEWAY_ALLOWLIST", "allowlist", split=True),
        _env("BT_GATEWAY_UPSTREAM_CONNECT_TIMEOUT_S", "upstream", "connect_timeout_s"),
        _env("BT_GATEWAY_UPSTREAM_READ_TIMEOUT_S", "upstream", "read_timeout_s"),
        _env("BT_GATEWAY_UPSTREAM_WRITE_TIMEOUT_S", "upstream", "write_timeout_s"),
        _env("BT_GATEWAY_UPSTREAM_CA_BUNDLE", "upstream", "ca_bundle"),
        _env("BT_GATEWAY_UPSTREAM_PROXY", "upstream", "proxy"),
        _env("BT_GATEWAY_LIMITS_MAX_BODY_MB", "limits", "max_body_mb"),
        _env("BT_GATEWAY_LIMITS_MAX_HEADER_KB", "limits", "max_header_kb"),
        _env("BT_GATEWAY_LIMITS_MAX_CONNECTIONS", "limits", "max_connections"),
        _env("BT_GATEWAY_LOGGING_LEVEL", "logging", "level"),
        _env("BT_GATEWAY_LOGGING_FORMAT", "logging", "format"),
        _env("BT_GATEWAY_SHUTDOWN_TIMEOUT_S", "shutdown_timeout_s"),
        _env("BT_GATEWAY_SHUTDOWN_DELAY_S", "shutdown_delay_s"),
        _env("BT_GATEWAY_AUDIT_ENABLED", "audit", "enabled"),
        _env("BT_GATEWAY_AUDIT_SINK", "audit", "sink"),
        _env("BT_GATEWAY_RELAY_SECRET", "relay", "secret"),
    ]
)


def flag(option: str, value: Any, *key: str) -> Override:
    """An override from a CLI flag such as `--listen-port`."""
    return Override(key=key, source=f"flag {option}", value=value)


def apply_override(data: dict[str, Any], override: Override) -> KeyPath:
    """Write the override into the raw config dict; return the key path it set (for error messages).

    `routes.<name>.<key>` addresses a route by name, since routes are a list in YAML.
    """
    if override.key[0] == "routes":
        return _apply_route(data, override)
    node = data
    for part in override.key[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"cannot set {'.'.join(override.key)}: {part!r} is not a mapping")
        node = child
    node[override.key[-1]] = override.value
    return override.key


def seed_routes(data: dict[str, Any], overrides: list[Override]) -> bool:
    """A file without routes, overridden from the environment: start from the built-in `app` route, and
    the built-in `data` route only when a variable names it (BT_GATEWAY_DATA_PLANE_URL). Pointing only
    the app route elsewhere (a self-hosted control plane) so keeps no route to Braintrust's hosted data
    plane, whose host the operator's allow-list need not name. True if it seeded."""
    named = {o.key[1] for o in overrides if o.key[0] == "routes"}
    if "routes" in data or not named:
        return False
    builtin = [r.model_dump(exclude_defaults=True) for r in default_routes()]
    data["routes"] = [r for r in builtin if r["name"] == APP_ROUTE or r["name"] in named]
    return True


def _apply_route(data: dict[str, Any], override: Override) -> KeyPath:
    """Set a key of the route named `routes.<name>` (see `seed_routes` for a file without routes)."""
    _, name, key = override.key
    routes = data.get("routes")
    if isinstance(routes, list):
        for index, route in enumerate(routes):
            if isinstance(route, dict) and route.get("name") == name:
                route[key] = override.value
                return ("routes", index, key)
    raise ValueError(f"no route named {name!r} to apply it to")
