"""The request pipeline: the per-request record (`Exchange`) and the policies run before forwarding.

Order: target -> allow-list -> rate limit -> forward (terminal, in `gateway.forward`) -> rewrite. Every
policy is built once from config into a `Pipeline`; the server swaps the whole object on reload, so a
request sees one consistent set of policies from start to end. Each branch taken is appended to
`Exchange.decisions`, which the access log records.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from yarl import URL

from gateway.config.model import GatewayConfig
from gateway.errors import Code, GatewayError, Reason
from gateway.policy.allowlist import Allowlist, canonical_host
from gateway.policy.external_url import ExternalUrl
from gateway.policy.forward_proxy import ForwardProxyPolicy
from gateway.policy.proxyauth import ProxyAuth, ScryptHash
from gateway.policy.ratelimit import LimitSpec, RateLimitSettings
from gateway.policy.routes import RouteTable, RouteTarget
from gateway.policy.urlrewrite import RewritePolicy, RuleSet

FORWARD_PROXY_ROUTE = "forward_proxy"
TUNNEL_ROUTE = "tunnel"  # the limiter's name for new CONNECT tunnels, counted per client address

BAD_TARGET = GatewayError(
    Code.BAD_REQUEST, "request target must be an absolute path", reason=Reason.MALFORMED_TARGET
)
CLIENT_GONE = GatewayError(Code.CLIENT_DISCONNECTED, "the client closed the connection")
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
    token_digest: str | None = None  # full sha256 of the caller's token; never the token itself
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_status: int | None = None
    error: GatewayError | None = None
    decisions: list[str] = field(default_factory=list)

    def refuse(self, error: GatewayError) -> None:
        """Record the error this request ends with (its status is the error's)."""
        self.error = error
        self.status = error.status

    def client_gone(self) -> None:
        """The client left before its response was complete: nginx's 499, whatever upstream said."""
        if self.error is None or self.error.code is not Code.CLIENT_DISCONNECTED:
            self.decisions.append("client:disconnected")
        self.refuse(CLIENT_GONE)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: the route it matched and the full upstream URL."""

    route: RouteTarget
    url: URL


def rate_limit_settings(config: GatewayConfig) -> RateLimitSettings:
    """The limiter's settings from config: the global limit plus per-route overrides (`off` -> None)."""
    rl = config.rate_limit
    routes: dict[str, LimitSpec | None] = {}
    for route in config.routes:
        if route.rate_limit is not None:
            routes[route.name] = LimitSpec(route.rate_limit.max_requests, route.rate_limit.window_s)
    return RateLimitSettings(
        default=LimitSpec(rl.max_requests, rl.window_s),
        routes=routes,
        strategy=rl.strategy,
        storage=rl.storage,
        on_storage_error=rl.on_storage_error,
        storage_timeout_ms=rl.storage_timeout_ms,
        anonymous=rl.anonymous,
    )


def rewrite_policy(config: GatewayConfig) -> RewritePolicy:
    """Built-in rules (app upstream -> public_url), then the config's extra rules, then advertised routes."""
    static: list[tuple[str, str]] = []
    app = config.route("app")
    if app is not None:
        static.append((app.upstream, config.public_url))
    static += [(rule.from_, rule.to) for rule in config.rewrite.rules]
    advertised = tuple((origin(r.upstream), r.prefix) for r in config.routes if r.advertise)
    return RewritePolicy(tuple(static), advertised, config.rewrite.max_buffer_kb * 1024)


def origin(url: str) -> str:
    """`scheme://host[:port]` of a URL (its path dropped), as written in responses."""
    parsed = URL(url)
    return str(parsed.origin())


def tunnel_limit_settings(config: GatewayConfig) -> RateLimitSettings:
    """New tunnels per client address: the same limiter, in process memory (it guards this process)."""
    rate = config.forward_proxy.rate_limit
    return RateLimitSettings(default=LimitSpec(rate.max_tunnels, rate.window_s))


class Pipeline:
    """The policies of one config generation, built once and never mutated."""

    def __init__(self, config: GatewayConfig, rewrite: RewritePolicy | None) -> None:
        self.config = config
        self.allowlist = Allowlist.parse(config.allowlist)
        self.routes = RouteTable(
            tuple(RouteTarget.from_url(r.name, r.prefix, r.upstream) for r in config.routes)
        )
        self.max_body_bytes = int(config.limits.max_body_mb * 1024 * 1024)
        self.max_header_bytes = config.limits.max_header_kb * 1024
        self.public_url = config.public_url
        self.external_url = ExternalUrl(config.advertise_url, config.trusted_proxies)
        self.rewrite = rewrite
        fp = config.forward_proxy
        self.forward_proxy = (
            ForwardProxyPolicy(self.allowlist, fp.connect_ports, fp.deny_private_addresses)
            if fp.enabled
            else None
        )
        self.proxy_auth = (
            ProxyAuth(
                {name: ScryptHash.parse(text) for name, text in fp.auth.users.items()},
                fp.auth.max_failures_per_minute,
            )
            if fp.auth
            else None
        )

    def target(self, exchange: Exchange, raw_path: str, raw_query: str) -> Target | GatewayError:
        """Pick the route for an origin-form path; the destination comes from config, never the request."""
        if not raw_path.startswith("/"):
            exchange.decisions.append("route:bad_target")
            return BAD_TARGET
        route = self.routes.match(raw_path)
        if route is None:
            exchange.decisions.append("route:none")
            return GatewayError(Code.NOT_FOUND, "no route matches this path", reason=Reason.NO_ROUTE)
        exchange.route = route.name
        exchange.decisions.append(f"route:{route.name}")
        return Target(route=route, url=route.url_for(raw_path, raw_query))

    async def absolute_target(
        self, exchange: Exchange, raw_target: str, proxy_authorization: str | None
    ) -> Target | GatewayError:
        """An absolute-form request (`GET http://host/path`): judged and forwarded by the URI's own host."""
        if self.forward_proxy is not None:
            refused = await self.authenticate(exchange, proxy_authorization)
            if refused is not None:
                return refused
        try:
            url = URL(raw_target, encoded=True)
        except ValueError:
            url = URL()
        host = canonical_host(url.raw_host) if url.absolute and url.raw_user is None else None
        if url.scheme not in ("http", "https") or host is None or url.port is None:
            exchange.decisions.append("forward_proxy:bad_target")
            return GatewayError(
                Code.BAD_REQUEST,
                "absolute request target must be http(s)://host[:port]/path",
                reason=Reason.MALFORMED_TARGET,
            )
        exchange.upstream_host = host
        denied = self.allowlist.check(host, url.port)
        if denied is not None:
            exchange.decisions.append("allowlist:deny")
            return denied
        if self.forward_proxy is None:
            exchange.decisions.append("forward_proxy:disabled")
            return GatewayError(Code.METHOD_NOT_ALLOWED, "forward-proxy requests are not enabled")
        route = RouteTarget(FORWARD_PROXY_ROUTE, "/", url.scheme, host, url.port, "")
        exchange.route = route.name
        exchange.decisions.append(f"route:{route.name}")
        return Target(route=route, url=route.url_for(url.raw_path or "/", url.raw_query_string))

    async def authenticate(self, exchange: Exchange, proxy_authorization: str | None) -> GatewayError | None:
        """Forward-proxy auth when configured; the header itself is hop-by-hop and never forwarded."""
        if self.proxy_auth is None:
            return None
        user = await self.proxy_auth.check(proxy_authorization, exchange.client_ip)
        if isinstance(user, GatewayError):
            exchange.decisions.append("proxy_auth:deny")
            return user
        exchange.decisions.append("proxy_auth:allow")
        return None

    def browser_redirect(self, exchange: Exchange, method: str, raw_target: str, accept: str) -> str | None:
        """Where a browser opening a webapp link printed with the gateway's URL should go: `public_url`.

        The SDK builds span permalinks from its app URL (the gateway); a person clicking one must land
        on the real webapp, not on a proxied page.
        """
        if method not in ("GET", "HEAD") or "text/html" not in accept:
            return None
        if not (raw_target == "/app" or raw_target.startswith(("/app/", "/app?"))):
            return None
        exchange.decisions.append("redirect:public_url")
        return self.public_url + raw_target

    def rewrite_rules(
        self, target: Target, remote: str | None, scheme: str, headers: Mapping[str, str]
    ) -> RuleSet | None:
        """The rule set for this response. Absolute-form (proxy) requests know no external URL of ours
        unless advertise_url is set, so they get only the static rules."""
        if self.rewrite is None:
            return None
        external = self.external_url.for_request(
            remote=remote,
            scheme=scheme,
            host=headers.get("Host") if target.route.name != FORWARD_PROXY_ROUTE else None,
            forwarded_proto=headers.get("X-Forwarded-Proto"),
            forwarded_host=headers.get("X-Forwarded-Host"),
        )
        return self.rewrite.rules_for(external)

    def admit(self, exchange: Exchange, target: Target) -> GatewayError | None:
        """Run the pre-forward policies; the first refusal wins."""
        url = target.url
        exchange.upstream_host = url.raw_host
        denied = self.allowlist.check(url.raw_host, url.port or 0)
        exchange.decisions.append("allowlist:deny" if denied else "allowlist:allow")
        return denied
