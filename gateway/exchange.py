"""The per-request record: what the client asked, what each step decided, and how the request ended.

Steps read the request view (method, target, headers, client address) and fill in the rest; the access log,
the metrics and the audit event are all written from this one record when the request ends.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from yarl import URL

from gateway.bypass import Bypass
from gateway.errors import Code, GatewayError, Reason
from gateway.logs import loggable_target
from gateway.policy.forward_proxy import ConnectTarget
from gateway.policy.paths import normalize_path
from gateway.policy.routes import RouteTarget

FORWARD_PROXY_ROUTE = "forward_proxy"  # absolute-form requests to no route's upstream
TUNNEL_ROUTE = "tunnel"  # CONNECT tunnels (metrics, and the tunnel limiter's bucket)
NO_ROUTE = "none"  # refused before a route was known (the metrics' route label)

CLIENT_GONE = GatewayError(Code.CLIENT_DISCONNECTED, "the client closed the connection")
BAD_TARGET = GatewayError(
    Code.BAD_REQUEST, "request target must be an absolute path", reason=Reason.MALFORMED_TARGET
)
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def request_id(offered: str | None) -> str:
    """The client's X-Request-Id when it is short and plain (safe to log and echo), else a fresh one.

    A fresh id correlates log lines; it guards nothing, so it comes from the fast generator, not the
    kernel's (a getrandom call per request).
    """
    if offered and _SANE_REQUEST_ID.match(offered):
        return offered
    return f"{random.getrandbits(128):032x}"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: the route it matched and the full upstream URL.

    `path`: the URL's path below the route's base, normalized (None: it climbs above the root), the one
    `deny_paths` and `body_paths` judge; worked out once, with the target.
    """

    route: RouteTarget
    url: URL
    path: str | None

    @classmethod
    def of(cls, route: RouteTarget, url: URL) -> Target:
        return cls(route, url, normalize_path(route.relative_path(url)))


@dataclass(slots=True)
class Exchange:
    """Everything known about one request, filled in as it moves through the chain; logged at the end."""

    request_id: str
    method: str
    raw_target: str  # the request-target exactly as sent (origin-, absolute- or authority-form)
    client_ip: str
    headers: Mapping[str, str] = field(default_factory=dict)  # case-insensitive in practice (CIMultiDict)
    scheme: str = "http"
    token_digest: str | None = None  # full sha256 of the caller's token; never the token itself
    route: str | None = None
    upstream_host: str | None = None
    target: Target | None = None  # set by the router (HTTP)
    connect: ConnectTarget | None = None  # set for CONNECT once its target parsed
    proxy_user: str | None = None  # who passed forward-proxy auth
    relay: bool = False  # a /_relay/ transfer to an object store: relayed as is, never rewritten
    response_headers: tuple[tuple[str, str], ...] = ()  # added to the response (RateLimit fields)
    status: int = 0
    upstream_status: int | None = None
    upstream_seconds: float | None = None  # time to the upstream's response head
    bytes_in: int = 0
    bytes_out: int = 0
    error: GatewayError | None = None
    audit: dict[str, str] | None = None  # the upstream's x-bt-audit-* headers, when audit is on
    decisions: list[str] = field(default_factory=list)
    bypasses: tuple[Bypass, ...] = ()  # ways around the gateway this request revealed (gateway/bypass.py)
    would_refuse: tuple[str, GatewayError] | None = None  # report mode: (step, error) enforce would have sent

    def relax(self, step: str, error: GatewayError | None) -> None:
        """Report mode let a refusal go. The first is the one enforce mode would have sent: it alone is
        logged and counted; later ones show in `decisions` only."""
        self.decisions.append(f"{step}:would_refuse")
        if self.would_refuse is None and error is not None:
            self.would_refuse = (step, error)

    def bypassed(self, bypass: Bypass) -> None:
        """Note a way around the gateway; the handler warns once per host and counts it."""
        self.bypasses += (bypass,)
        self.decisions.append(f"bypass:{bypass.event}")

    @property
    def path(self) -> str:
        """The target as the log shows it (`logs.loggable_target`): no query, no relay token."""
        return loggable_target(self.raw_target)

    def refuse(self, error: GatewayError) -> None:
        """Record the error this request ends with (its status is the error's)."""
        self.error = error
        self.status = error.status

    def client_gone(self) -> None:
        """The client left before its response was complete: nginx's 499, whatever upstream said."""
        if self.error is None or self.error.code is not Code.CLIENT_DISCONNECTED:
            self.decisions.append("client:disconnected")
        self.refuse(CLIENT_GONE)
