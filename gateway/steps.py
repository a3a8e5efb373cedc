"""The request steps: each one plain object, built once from config, deciding on an `Exchange` alone.

A step answers None when it has nothing to decide for this request (proxy auth on a reverse-proxy request),
else a `Decision`: an outcome the runner records as `step:outcome`, and an error or a local reply that ends
the chain. No step touches a socket; `gateway.chain` declares their order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from yarl import URL

from gateway.errors import Code, GatewayError, Reason
from gateway.exchange import BAD_TARGET, FORWARD_PROXY_ROUTE, TUNNEL_ROUTE, Exchange, Target
from gateway.policy.allowlist import Allowlist, canonical_host
from gateway.policy.external_url import ExternalUrl
from gateway.policy.forward_proxy import ForwardProxyPolicy, parse_connect_target
from gateway.policy.paths import PathDenyList
from gateway.policy.proxyauth import ProxyAuth
from gateway.policy.ratelimit import RateLimiter
from gateway.policy.routes import RouteTable, RouteTarget
from gateway.policy.urlrewrite import RewritePolicy, RuleSet


@dataclass(frozen=True, slots=True)
class Decision:
    """One step's verdict: `outcome` for the log; `error` or `location` (a redirect) end the chain."""

    outcome: str
    error: GatewayError | None = None
    location: str | None = None

    @property
    def final(self) -> bool:
        return self.error is not None or self.location is not None


class Step(Protocol):
    name: str

    async def decide(self, exchange: Exchange) -> Decision | None: ...


ALLOW = Decision("allow")
BODY_TOO_LARGE = GatewayError(Code.BODY_TOO_LARGE, "request body is over the limit")
HEADERS_TOO_LARGE = GatewayError(Code.HEADERS_TOO_LARGE, "request header fields are too large")
BAD_ABSOLUTE_TARGET = GatewayError(
    Code.BAD_REQUEST,
    "absolute request target must be http(s)://host[:port]/path",
    reason=Reason.MALFORMED_TARGET,
)
PROXY_DISABLED = GatewayError(Code.METHOD_NOT_ALLOWED, "forward-proxy requests are not enabled")
CONNECT_DISABLED = GatewayError(Code.METHOD_NOT_ALLOWED, "CONNECT is not enabled")


def is_proxied(exchange: Exchange) -> bool:
    """Whether the client uses the gateway as its proxy (CONNECT or an absolute-form target)."""
    return exchange.method == "CONNECT" or not exchange.raw_target.startswith("/")


class SizeLimits:
    """Oversized header blocks and declared bodies are refused before anything else is looked at."""

    name = "limits"

    def __init__(self, max_header_bytes: int, max_body_bytes: int) -> None:
        self._headers = Decision("headers", HEADERS_TOO_LARGE)
        self._body = Decision("body", BODY_TOO_LARGE)
        self._max_header_bytes = max_header_bytes
        self._max_body_bytes = max_body_bytes

    async def decide(self, exchange: Exchange) -> Decision | None:
        if sum(len(k) + len(v) + 4 for k, v in exchange.headers.items()) > self._max_header_bytes:
            return self._headers
        length = exchange.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self._max_body_bytes:
            return self._body
        return None


class BrowserRedirect:
    """A person opening a webapp link printed with the gateway's URL lands on `public_url`.

    The SDK builds span permalinks from its app URL (the gateway); such a link must open the real webapp.
    """

    name = "redirect"

    def __init__(self, public_url: str) -> None:
        self._public_url = public_url

    async def decide(self, exchange: Exchange) -> Decision | None:
        target = exchange.raw_target
        if exchange.method not in ("GET", "HEAD") or "text/html" not in exchange.headers.get("Accept", ""):
            return None
        if not (target == "/app" or target.startswith(("/app/", "/app?"))):
            return None
        return Decision("public_url", location=self._public_url + target)


class Router:
    """Picks the destination: a route for an origin-form path, the URI's own host for an absolute one."""

    name = "route"

    def __init__(self, routes: RouteTable) -> None:
        self._routes = routes
        self._found = {route.name: Decision(route.name) for route in routes.routes}
        self._none = Decision(
            "none", GatewayError(Code.NOT_FOUND, "no route matches this path", reason=Reason.NO_ROUTE)
        )

    async def decide(self, exchange: Exchange) -> Decision:
        raw = exchange.raw_target
        if raw.startswith("/"):
            path, _, query = raw.partition("?")
            route = self._routes.match(path.partition("#")[0])
            if route is None:
                return self._none
            exchange.route = route.name
            exchange.target = Target(route, route.url_for(path.partition("#")[0], query.partition("#")[0]))
            exchange.upstream_host = route.host
            return self._found[route.name]
        if raw[:8].lower().startswith(("http://", "https://")):
            return self._absolute(exchange, raw)
        return Decision("bad_target", BAD_TARGET)

    @staticmethod
    def _absolute(exchange: Exchange, raw: str) -> Decision:
        """`GET http://host/path`: judged and forwarded by the URI's own host, never the Host header."""
        try:
            url = URL(raw, encoded=True)
        except ValueError:
            url = URL()
        host = canonical_host(url.raw_host) if url.absolute and url.raw_user is None else None
        if url.scheme not in ("http", "https") or host is None or url.port is None:
            return Decision("bad_target", BAD_ABSOLUTE_TARGET)
        route = RouteTarget(FORWARD_PROXY_ROUTE, "/", url.scheme, host, url.port, "")
        exchange.route = route.name
        exchange.upstream_host = host
        exchange.target = Target(route, route.url_for(url.raw_path or "/", url.raw_query_string))
        return Decision(FORWARD_PROXY_ROUTE)


class Allowlisted:
    """The egress allow-list, judged on the destination the router chose (the connector checks again)."""

    name = "allowlist"

    def __init__(self, allowlist: Allowlist) -> None:
        self._allowlist = allowlist

    async def decide(self, exchange: Exchange) -> Decision:
        assert exchange.target is not None  # the router ran
        url = exchange.target.url
        denied = self._allowlist.check(url.raw_host, url.port or 0)
        return ALLOW if denied is None else Decision("deny", denied)


class ForwardProxyMode:
    """Absolute-form requests need forward-proxy mode; the allow-list has spoken first."""

    name = "forward_proxy"

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled

    async def decide(self, exchange: Exchange) -> Decision | None:
        if not is_proxied(exchange):
            return None
        return ALLOW if self._enabled else Decision("disabled", PROXY_DISABLED)


class ConnectTargetParsed:
    """A CONNECT's authority-form target, parsed strictly (see `policy.forward_proxy`)."""

    name = "connect"

    async def decide(self, exchange: Exchange) -> Decision:
        target = parse_connect_target(exchange.raw_target)
        if isinstance(target, GatewayError):
            return Decision("bad_target", target)
        exchange.connect = target
        exchange.upstream_host = target.host
        exchange.route = TUNNEL_ROUTE
        return Decision("target")


class ConnectAllowed:
    """Tunnels: allow-listed host and a port in `connect_ports`; CONNECT itself may be switched off."""

    name = "forward_proxy"

    def __init__(self, policy: ForwardProxyPolicy | None, allowlist: Allowlist) -> None:
        self._policy = policy
        self._allowlist = allowlist

    async def decide(self, exchange: Exchange) -> Decision:
        target = exchange.connect
        assert target is not None  # parsed by the step before
        if self._policy is None:
            denied = self._allowlist.check(target.host, target.port)
            return Decision("disabled", denied or CONNECT_DISABLED)
        denied = self._policy.check_target(target)
        return ALLOW if denied is None else Decision("deny", denied)


class ProxyAuthenticated:
    """`Proxy-Authorization: Basic` for clients using the gateway as their proxy; reverse mode is exempt."""

    name = "proxy_auth"

    def __init__(self, auth: ProxyAuth) -> None:
        self._auth = auth

    async def decide(self, exchange: Exchange) -> Decision | None:
        if not is_proxied(exchange):
            return None
        user = await self._auth.check(exchange.headers.get("Proxy-Authorization"), exchange.client_ip)
        return Decision("deny", user) if isinstance(user, GatewayError) else ALLOW


class DeniedPaths:
    """`deny_paths` globs, matched on the normalized path the upstream would receive."""

    name = "deny_paths"

    def __init__(self, global_list: PathDenyList, per_route: dict[str, PathDenyList]) -> None:
        self._global = global_list
        self._routes = per_route

    async def decide(self, exchange: Exchange) -> Decision | None:
        assert exchange.target is not None and exchange.route is not None
        route_list = self._routes.get(exchange.route)
        if not self._global and not route_list:
            return None
        path = exchange.target.route.relative_path(exchange.target.url)
        error = self._global.check(path) or (route_list.check(path) if route_list else None)
        return ALLOW if error is None else Decision("deny", error)


class RateLimited:
    """The per-token limit of the request's route; its RateLimit fields go on the response."""

    name = "ratelimit"

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def decide(self, exchange: Exchange) -> Decision:
        assert exchange.route is not None
        decision = await self._limiter.decide(exchange.route, exchange.token_digest, exchange.client_ip)
        exchange.response_headers = decision.headers
        return Decision(decision.outcome, decision.error)


class TunnelLimited:
    """New tunnels per client address (the token travels inside TLS, out of sight)."""

    name = "tunnel_limit"

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def decide(self, exchange: Exchange) -> Decision:
        decision = await self._limiter.check(TUNNEL_ROUTE, "ip:" + exchange.client_ip)
        return Decision(decision.outcome, decision.error)


class ResponseRewrite:
    """The response side: static rules, plus each advertised route's origin -> the gateway's own URL."""

    name = "rewrite"

    def __init__(self, policy: RewritePolicy, external: ExternalUrl) -> None:
        self._policy = policy
        self._external = external

    def rules_for(self, exchange: Exchange) -> RuleSet:
        """Absolute-form (proxy) requests know no external URL of ours unless `advertise_url` is set."""
        headers = exchange.headers
        external = self._external.for_request(
            remote=exchange.client_ip,
            scheme=exchange.scheme,
            host=headers.get("Host") if exchange.route != FORWARD_PROXY_ROUTE else None,
            forwarded_proto=headers.get("X-Forwarded-Proto"),
            forwarded_host=headers.get("X-Forwarded-Host"),
        )
        return self._policy.rules_for(external)
