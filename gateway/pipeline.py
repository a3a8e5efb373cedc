"""The request pipeline: the per-request record (`Exchange`) and the policies run before forwarding.

Order: target -> allow-list -> rate limit -> forward (terminal, in `gateway.forward`) -> rewrite. Every
policy is built once from config into a `Pipeline`; the server swaps the whole object on reload, so a
request sees one consistent set of policies from start to end. Each branch taken is appended to
`Exchange.decisions`, which the access log records.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from yarl import URL

from gateway.config.model import GatewayConfig
from gateway.errors import Code, GatewayError
from gateway.policy.allowlist import Allowlist
from gateway.policy.routes import RouteTable, RouteTarget

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def request_id(offered: str | None) -> str:
    """The client's X-Request-Id when it is short and plain (safe to log and echo), else a fresh one."""
    if offered and _SANE_REQUEST_ID.match(offered):
        return offered
    return secrets.token_hex(16)


@dataclass(slots=True)
class Exchange:
    """Everything known about one request, filled in as it moves through the pipeline; logged at the end."""

    request_id: str
    method: str
    path: str
    client_ip: str
    route: str | None = None
    upstream_host: str | None = None
    token_fp: str | None = None
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    error: GatewayError | None = None
    decisions: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: the route it matched and the full upstream URL."""

    route: RouteTarget
    url: URL


class Pipeline:
    """The policies of one config generation, built once and never mutated."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.allowlist = Allowlist.parse(config.allowlist)
        self.routes = RouteTable(
            tuple(RouteTarget.from_url(r.name, r.prefix, r.upstream) for r in config.routes)
        )
        self.max_body_bytes = int(config.limits.max_body_mb * 1024 * 1024)
        self.max_header_bytes = config.limits.max_header_kb * 1024

    def target(self, exchange: Exchange, raw_path: str, raw_query: str) -> Target | GatewayError:
        """Pick the route for an origin-form path; the destination comes from config, never the request."""
        if not raw_path.startswith("/"):
            exchange.decisions.append("route:bad_target")
            return GatewayError(Code.BAD_REQUEST, "request target must be an absolute path")
        route = self.routes.match(raw_path)
        if route is None:
            exchange.decisions.append("route:none")
            return GatewayError(Code.NOT_FOUND, "no route matches this path")
        exchange.route = route.name
        exchange.decisions.append(f"route:{route.name}")
        return Target(route=route, url=route.url_for(raw_path, raw_query))

    def admit(self, exchange: Exchange, target: Target) -> GatewayError | None:
        """Run the pre-forward policies; the first refusal wins."""
        url = target.url
        exchange.upstream_host = url.raw_host
        denied = self.allowlist.check(url.raw_host, url.port or 0)
        exchange.decisions.append("allowlist:deny" if denied else "allowlist:allow")
        return denied
