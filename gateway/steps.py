"""The request steps: each one plain object, built once from config, deciding on an `Exchange` alone.

A step answers None when it has nothing to decide for this request (proxy auth on a reverse-proxy request),
else a `Decision`: an outcome the runner records as `step:outcome`, and an error or a local reply that ends
the chain. No step touches a socket; `gateway.chain` declares their order.

A policy step lists in `relaxable` the outcomes report mode may let go (`mode: report`, judged by the
runner); a step without one (size bounds, malformed requests, proxy auth, relay links) is never relaxed.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol

from yarl import URL

from gateway.bypass import USE_REVERSE_MODE, Bypass
from gateway.errors import Code, GatewayError, Reason
from gateway.exchange import BAD_TARGET, FORWARD_PROXY_ROUTE, TUNNEL_ROUTE, Exchange, Target
from gateway.policy.allowlist import Allowlist, canonical_host
from gateway.policy.credentials import FINGERPRINT_HEX
from gateway.policy.external_url import valid_host
from gateway.policy.forward_proxy import ForwardProxyPolicy, parse_connect_target
from gateway.policy.paths import PathDenyList
from gateway.policy.proxyauth import ProxyAuth
from gateway.policy.ratelimit import RateLimiter, RatePeek
from gateway.policy.routes import RouteTable, RouteTarget
from gateway.relay import DENIED as RELAY_DENIED
from gateway.relay import PREFIX as RELAY_PREFIX
from gateway.relay import Relay

Fact = tuple[str, str | int | float | bool | None]


@dataclass(frozen=True, slots=True)
class Decision:
    """One step's verdict: `outcome` for the log; `error` or `location` (a redirect) end the chain.

    `facts`: what a step's read-only `peek` looked at (a rate limit's key and count), for `explain`.
    """

    outcome: str
    error: GatewayError | None = None
    location: str | None = None
    facts: tuple[Fact, ...] = ()
    final: bool = field(init=False, repr=False, compare=False)  # it ends the chain: a field, read per step

    def __post_init__(self) -> None:
        object.__setattr__(self, "final", self.error is not None or self.location is not None)


class Step(Protocol):
    """A step decides synchronously; one that needs I/O (a store, a password hash) is a coroutine.

    A step whose decision counts something (a rate limit, a failed password) also has `peek`: the same
    decision, counting nothing, for `bt-gateway explain` (see `Chain.trace`).
    """

    name: str

    def decide(self, exchange: Exchange) -> Decision | Awaitable[Decision | None] | None: ...


ALLOW = Decision("allow")
DENY = frozenset({"deny"})  # the `relaxable` of a step whose one policy refusal is `deny`
BODY_TOO_LARGE = GatewayError(Code.BODY_TOO_LARGE, "request body is over the limit")
HEADERS_TOO_LARGE = GatewayError(Code.HEADERS_TOO_LARGE, "request header fields are too large")
BAD_ABSOLUTE_TARGET = GatewayError(
    Code.BAD_REQUEST,
    "absolute request target must be http(s)://host[:port]/path",
    reason=Reason.MALFORMED_TARGET,
)
PROXY_DISABLED = GatewayError(Code.METHOD_NOT_ALLOWED, "forward-proxy requests are not enabled")
TRACE_REFUSED = GatewayError(Code.METHOD_NOT_ALLOWED, "TRACE and TRACK are not allowed")
BAD_HOST = GatewayError(Code.BAD_HOST, "the Host or X-Forwarded-Host header is not a valid host[:port]")
AMBIGUOUS = GatewayError(
    Code.AMBIGUOUS_CREDENTIALS, "more than one Authorization (or Proxy-Authorization) header was sent"
)
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

    def decide(self, exchange: Exchange) -> Decision | None:
        headers = exchange.headers
        size = sum(map(len, headers.keys())) + sum(map(len, headers.values())) + 4 * len(headers)
        if size > self._max_header_bytes:
            return self._headers
        length = headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self._max_body_bytes:
            return self._body
        return None


class MethodAllowed:
    """TRACE and TRACK echo requests back, credentials included: refused (report mode forwards and logs)."""

    name = "method"
    relaxable = frozenset({"trace"})
    _REFUSED = Decision("trace", TRACE_REFUSED)

    def decide(self, exchange: Exchange) -> Decision | None:
        return self._REFUSED if exchange.method in ("TRACE", "TRACK") else None


class HostHeader:
    """`Host` and `X-Forwarded-Host` must each be one valid `host[:port]`: they size rewritten URLs."""

    name = "host"
    _BAD = Decision("bad", BAD_HOST)

    def decide(self, exchange: Exchange) -> Decision | None:
        headers = exchange.headers
        getall = getattr(headers, "getall", None)
        hosts = getall("Host", []) if getall is not None else [h for h in (headers.get("Host"),) if h]
        if len(hosts) > 1 or (hosts and not valid_host(hosts[0])):
            return self._BAD
        forwarded = headers.get("X-Forwarded-Host")
        if forwarded is not None:
            for host in forwarded.split(","):
                if not valid_host(host.strip()):
                    return self._BAD
        return None


class Credentials:
    """One credential per request: two `Authorization` headers would pick a bucket by header order."""

    name = "credentials"
    _AMBIGUOUS = Decision("ambiguous", AMBIGUOUS)

    def decide(self, exchange: Exchange) -> Decision | None:
        getall = getattr(exchange.headers, "getall", None)
        if getall is None:
            return None
        if len(getall("Authorization", ())) > 1 or len(getall("Proxy-Authorization", ())) > 1:
            return self._AMBIGUOUS
        return None


class BrowserRedirect:
    """A person opening a webapp link printed with the gateway's URL lands on `public_url`.

    The SDK builds span permalinks from its app URL (the gateway); such a link must open the real webapp.
    """

    name = "redirect"

    def __init__(self, public_url: str) -> None:
        self._public_url = public_url

    def decide(self, exchange: Exchange) -> Decision | None:
        target = exchange.raw_target
        if exchange.method not in ("GET", "HEAD") or "text/html" not in exchange.headers.get("Accept", ""):
            return None
        if not (target == "/app" or target.startswith(("/app/", "/app?"))):
            return None
        return Decision("public_url", location=self._public_url + target)


SEEN_TARGETS = 1024  # routed origin-form targets remembered per generation (about 1 MB at most)
SEEN_TARGET_CHARS = 256  # longer targets are routed every time


class Router:
    """Picks the destination: a route for an origin-form path, the URI's own host for an absolute one."""

    name = "route"

    def __init__(self, routes: RouteTable, relay: Relay | None = None) -> None:
        self._routes = routes
        self._relay = relay  # None: relay links are refused
        self._found = {route.name: Decision(route.name) for route in routes.routes}
        self._by_origin: dict[tuple[str, str, int], list[RouteTarget]] = {}
        for route in routes.routes:  # longest base path first, like prefixes
            self._by_origin.setdefault((route.scheme, route.host, route.port), []).append(route)
        for candidates in self._by_origin.values():
            candidates.sort(key=lambda r: len(r.base_path), reverse=True)
        self._none = Decision(
            "none", GatewayError(Code.NOT_FOUND, "no route matches this path", reason=Reason.NO_ROUTE)
        )
        # Origin-form targets already routed: SDKs repeat a few dozen paths, so most requests route with
        # one dict lookup. A Target is immutable and this table belongs to one generation.
        self._seen: dict[str, Target] = {}

    def decide(self, exchange: Exchange) -> Decision:
        raw = exchange.raw_target
        target = self._seen.get(raw)
        if target is None:
            if raw.startswith(RELAY_PREFIX):
                return self._relayed(exchange, raw[len(RELAY_PREFIX) :].partition("?")[0])
            if not raw.startswith("/"):
                return self._absolute(exchange, raw)
            path, _, query = raw.partition("?")
            route = self._routes.match(path.partition("#")[0])
            if route is None:
                return self._none
            target = Target.of(route, route.url_for(path.partition("#")[0], query.partition("#")[0]))
            if len(raw) <= SEEN_TARGET_CHARS:
                if len(self._seen) >= SEEN_TARGETS:
                    self._seen.clear()  # bounded: endless new paths only lose the shortcut
                self._seen[raw] = target
        exchange.route = target.route.name
        exchange.target = target
        exchange.upstream_host = target.route.host
        return self._found[target.route.name]

    def _absolute(self, exchange: Exchange, raw: str) -> Decision:
        """`GET http://host/path`: judged and forwarded by the URI's own host, never the Host header.

        A URI on a route's upstream counts in that route's bucket (and obeys its deny-list): a token has
        one quota, whichever mode it uses.
        """
        if not raw[:8].lower().startswith(("http://", "https://")):
            return Decision("bad_target", BAD_TARGET)
        try:
            url = URL(raw, encoded=True)
        except ValueError:
            url = URL()
        host = canonical_host(url.raw_host) if url.absolute and url.raw_user is None else None
        if url.scheme not in ("http", "https") or host is None or url.port is None:
            return Decision("bad_target", BAD_ABSOLUTE_TARGET)
        path = url.raw_path or "/"
        route = self._route_of(url.scheme, host, url.port, path)
        if route is None:
            route = RouteTarget(FORWARD_PROXY_ROUTE, "/", url.scheme, host, url.port, "")
        exchange.route = route.name
        exchange.upstream_host = host
        target = RouteTarget(route.name, "/", url.scheme, host, url.port, route.base_path)  # the URI as sent
        sent = target.url_for(path[len(route.base_path) :], url.raw_query_string)
        exchange.target = Target.of(target, sent)
        return self._found.get(route.name) or Decision(FORWARD_PROXY_ROUTE)

    def _relayed(self, exchange: Exchange, token: str) -> Decision:
        """`/_relay/<token>`: the signed URL the token carries, in the bucket of the route that issued it and
        of the token it was handed to (whatever credential this request carries, or lacks)."""
        grant = self._relay.open(token, exchange.method) if self._relay is not None else RELAY_DENIED
        if isinstance(grant, GatewayError):
            return Decision("relay_denied", grant)
        url = grant.url
        assert url.raw_host is not None and url.port is not None
        route = RouteTarget(grant.route, "/", url.scheme, url.raw_host, url.port, "")
        exchange.route, exchange.upstream_host, exchange.relay = grant.route, url.raw_host, True
        exchange.token_digest = grant.token_digest
        exchange.target = Target.of(route, url)
        return Decision("relay")

    def _route_of(self, scheme: str, host: str, port: int, path: str) -> RouteTarget | None:
        for route in self._by_origin.get((scheme, host, port), ()):
            base = route.base_path
            if not base or path == base or path.startswith(base + "/"):
                return route
        return None


class Allowlisted:
    """The egress allow-list, judged on the destination the router chose (the connector checks again).

    A configured route's upstream is judged once, when the generation is built; a destination a request
    names (absolute-form, a relay link) is judged per request.
    """

    name = "allowlist"
    relaxable = DENY

    def __init__(self, allowlist: Allowlist, routes: RouteTable) -> None:
        self._allowlist = allowlist
        self._judged: dict[int, Decision] = {}  # id of a configured RouteTarget -> its verdict
        self._keep = routes.routes  # the judged objects stay alive, so their ids stay theirs
        for route in routes.routes:
            denied = allowlist.check(route.host, route.port)
            self._judged[id(route)] = ALLOW if denied is None else Decision("deny", denied)

    def decide(self, exchange: Exchange) -> Decision:
        target = exchange.target
        assert target is not None  # the router ran
        judged = self._judged.get(id(target.route))
        if judged is not None:
            return judged
        url = target.url
        denied = self._allowlist.check(url.raw_host, url.port or 0)
        return ALLOW if denied is None else Decision("deny", denied)


class ForwardProxyMode:
    """Absolute-form requests need forward-proxy mode and a port in `http_ports` (no port scanning)."""

    name = "forward_proxy"
    relaxable = DENY  # a port outside http_ports; forward-proxy mode switched off stays refused

    def __init__(self, enabled: bool, http_ports: tuple[int, ...]) -> None:
        self._enabled = enabled
        self._ports = frozenset(http_ports)

    def decide(self, exchange: Exchange) -> Decision | None:
        if not is_proxied(exchange):
            return None
        if not self._enabled:
            return Decision("disabled", PROXY_DISABLED)
        assert exchange.target is not None
        port = exchange.target.route.port
        if port not in self._ports:
            error = GatewayError(
                Code.EGRESS_DENIED,
                f"forward-proxy requests to port {port} are not allowed",
                reason=Reason.PORT_NOT_ALLOWED,
            )
            return Decision("deny", error)
        return ALLOW


class ConnectTargetParsed:
    """A CONNECT's authority-form target, parsed strictly (see `policy.forward_proxy`)."""

    name = "connect"

    def decide(self, exchange: Exchange) -> Decision:
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
    relaxable = DENY  # allow-list, connect_ports, a limited route's host; CONNECT switched off stays refused

    def __init__(
        self,
        policy: ForwardProxyPolicy | None,
        allowlist: Allowlist,
        reverse_only: dict[str, GatewayError] | None = None,
    ) -> None:
        """`reverse_only`: hosts a rate-limited route serves, when tunnels to them are refused."""
        self._policy = policy
        self._allowlist = allowlist
        self._reverse_only = reverse_only or {}

    def decide(self, exchange: Exchange) -> Decision:
        target = exchange.connect
        assert target is not None  # parsed by the step before
        if self._policy is None:
            denied = self._allowlist.check(target.host, target.port)
            return Decision("disabled", denied or CONNECT_DISABLED)
        denied = self._policy.check_target(target)
        if denied is None and (denied := self._reverse_only.get(target.host)) is not None:
            exchange.bypassed(Bypass(USE_REVERSE_MODE, target.host, denied.detail))
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
        return self._decided(exchange, user)

    async def peek(self, exchange: Exchange) -> Decision | None:
        """`decide` counting no failed attempt."""
        if not is_proxied(exchange):
            return None
        user = await self._auth.check(
            exchange.headers.get("Proxy-Authorization"), exchange.client_ip, count=False
        )
        return self._decided(exchange, user)

    @staticmethod
    def _decided(exchange: Exchange, user: str | GatewayError) -> Decision:
        if isinstance(user, GatewayError):
            return Decision("deny", user)
        exchange.proxy_user = user
        return ALLOW


class DeniedPaths:
    """`deny_paths` globs, matched on the normalized path the upstream would receive."""

    name = "deny_paths"
    relaxable = DENY

    def __init__(self, global_list: PathDenyList, per_route: dict[str, PathDenyList]) -> None:
        self._global = global_list
        self._routes = per_route
        self._any = bool(global_list) or any(per_route.values())  # none: every request passes at once

    def decide(self, exchange: Exchange) -> Decision | None:
        assert exchange.target is not None and exchange.route is not None
        if exchange.relay or not self._any:
            return None  # an object store's path is not the gateway's to judge
        route_list = self._routes.get(exchange.route)
        if not self._global and not route_list:
            return None
        path = exchange.target.path
        error = self._global.judge(path) or (route_list.judge(path) if route_list else None)
        return ALLOW if error is None else Decision("deny", error)


# The limiter's verdicts on the request; `storage_error_deny` (a store outage with on_storage_error: deny)
# is not one, and stays refused.
RATE_REFUSALS = frozenset({"deny", "queue_full", "delay_too_long", "anonymous_denied"})


class RateLimited:
    """The per-token limit of the request's route; its RateLimit fields go on the response."""

    name = "ratelimit"
    relaxable = RATE_REFUSALS

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def decide(self, exchange: Exchange) -> Decision:
        assert exchange.route is not None
        decision = await self._limiter.decide(exchange.route, exchange.token_digest, exchange.client_ip)
        exchange.response_headers = decision.headers
        return Decision(decision.outcome, decision.error)

    async def peek(self, exchange: Exchange) -> Decision:
        return await peek_rate(self._limiter, exchange)


class RateLimitedNow:
    """`RateLimited` for a limiter that never awaits (memory, no delay): no coroutine per request."""

    name = "ratelimit"
    relaxable = RATE_REFUSALS

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    def decide(self, exchange: Exchange) -> Decision:
        assert exchange.route is not None
        decision = self._limiter.decide_now(exchange.route, exchange.token_digest, exchange.client_ip)
        exchange.response_headers = decision.headers
        return ALLOW if decision.outcome == "allow" else Decision(decision.outcome, decision.error)

    async def peek(self, exchange: Exchange) -> Decision:
        return await peek_rate(self._limiter, exchange)


def rate_limited(limiter: RateLimiter) -> RateLimited | RateLimitedNow:
    return RateLimitedNow(limiter) if limiter.immediate else RateLimited(limiter)


async def peek_rate(limiter: RateLimiter, exchange: Exchange) -> Decision:
    """The rate-limit step's decision read without counting, with the key and count it read."""
    assert exchange.route is not None
    peeked = await limiter.peek(exchange.route, exchange.token_digest, exchange.client_ip)
    return Decision(peeked.decision.outcome, peeked.decision.error, facts=rate_facts(limiter, peeked))


def rate_facts(limiter: RateLimiter, peeked: RatePeek) -> tuple[Fact, ...]:
    """A peeked limit as `explain` shows it: the key as the logs do (a token only as its fingerprint),
    the count read, the limit and the kind of store (never its URI, which may hold a password)."""
    kind, _, ident = (peeked.key or "").partition(":")
    if kind == "tok":
        kind, ident = "token", ident[:FINGERPRINT_HEX]
    spec = peeked.spec
    return (
        ("key_kind", {"ip": "client_ip", "user": "proxy_user"}.get(kind, kind) or None),
        ("key_id", ident or None),
        ("count", peeked.in_window),
        ("max_requests", spec.max_requests if spec else None),
        ("window_s", spec.window_s if spec else None),
        ("on_limit", spec.on_limit if spec else None),
        ("storage", limiter.settings.storage.partition("://")[0]),
        ("shared", limiter.shared),
        ("wait_s", round(peeked.decision.wait_s, 3)),
    )


class TunnelLimited:
    """New tunnels per client address (the token travels inside TLS, out of sight)."""

    name = "tunnel_limit"
    relaxable = DENY

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def decide(self, exchange: Exchange) -> Decision:
        """Per authenticated user when proxy auth is on (one NAT, many users), else per address."""
        decision = await self._limiter.check(TUNNEL_ROUTE, self._key(exchange))
        return Decision(decision.outcome, decision.error)

    async def peek(self, exchange: Exchange) -> Decision:
        """`decide` counting no tunnel."""
        peeked = await self._limiter.peek_key(TUNNEL_ROUTE, self._key(exchange))
        return Decision(
            peeked.decision.outcome, peeked.decision.error, facts=rate_facts(self._limiter, peeked)
        )

    @staticmethod
    def _key(exchange: Exchange) -> str:
        user = exchange.proxy_user
        return "user:" + user if user is not None else "ip:" + exchange.client_ip
