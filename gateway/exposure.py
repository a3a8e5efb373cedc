"""Start-up warnings about who can reach what: said by `serve` (a log line) and `check-config` (stderr).

A `Notice` is one thing an operator should know about a config that is valid but exposes something. Both
commands render the same list (gateway/generation.py `warnings()`), so they never disagree. Report mode is
one: a gateway that lets through what it would refuse says so at every start and reload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.config.model import GatewayConfig
from gateway.config.overrides import KeyPath
from gateway.policy.addresses import is_loopback
from gateway.policy.admin_access import state_changes_open


@dataclass(frozen=True, slots=True)
class Notice:
    """`event` names the log line; `key` the config key to change; `message` is the one line shown."""

    event: str
    key: KeyPath
    message: str
    fields: Mapping[str, object] = field(default_factory=dict)  # extra log fields (hosts, ...)


def exposure_notices(config: GatewayConfig) -> list[Notice]:
    """A forward proxy anyone can use, an admin listener whose POST /reload is shut for want of a token."""
    notices = []
    admin, listen, proxy = config.admin, config.listen, config.forward_proxy
    if not state_changes_open(admin.token, admin.host):
        notices.append(
            Notice(
                "admin_reload_disabled",
                ("admin", "token"),
                f"admin.host {admin.host} is not loopback and no admin.token is set: POST /reload answers "
                "403 (SIGHUP and serve --watch still reload); set admin.token (env BT_GATEWAY_ADMIN_TOKEN) "
                "or admin.token_file to enable it",
            )
        )
    if proxy.enabled and proxy.auth is None and not is_loopback(listen.host):
        notices.append(
            Notice(
                "forward_proxy_open",
                ("forward_proxy", "auth"),
                f"forward_proxy is enabled on listen.host {listen.host} without auth: anyone who reaches "
                f"port {listen.port} can tunnel to the allow-listed hosts; set forward_proxy.auth, or "
                "forward_proxy.enabled: false, or listen.host: 127.0.0.1",
            )
        )
    notice = report_mode_notice(config)
    if notice is not None:
        notices.append(notice)
    return notices


def report_mode_notice(config: GatewayConfig) -> Notice | None:
    """Which requests report mode lets through: the routes it is on, and the unrouted ones at top level."""
    routes = config.reported_routes
    if config.mode != "report" and not routes:
        return None
    scope = f"route{'s' if len(routes) > 1 else ''} {', '.join(routes)}" if routes else "no route"
    if config.mode == "report":
        key: KeyPath = ("mode",)
        scope += ", tunnels and requests to no route"
    else:
        key = ("routes", next(i for i, r in enumerate(config.routes) if r.name == routes[0]), "mode")
    return Notice(
        "report_mode",
        key,
        f"report mode is on for {scope}: what the allow-list, deny_paths, rate limits, the method check, "
        "forward_proxy ports and the tunnel policy would refuse is let through and logged as would_refuse; "
        "set mode: enforce to refuse it",
        {"routes": list(routes), "top_level": config.mode},
    )
