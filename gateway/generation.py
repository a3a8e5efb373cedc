"""One config's runtime, built whole: the step chains, limiters, egress guard, resolver and upstream session.

`check-config` builds one and closes it without opening a listener, so whatever `serve` would refuse,
`check-config` refuses first, with the key at fault. The server holds one generation at a time; a request
holds the one it started with until it ends, and a generation replaced by a reload is closed when its last
request is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import aiohttp
from limits.errors import ConfigurationError
from yarl import URL

from gateway.audit import Audit, AuditSink
from gateway.chain import Chain, Modes, connect_chain, http_chain, path_deny_lists
from gateway.config.model import GatewayConfig
from gateway.config.overrides import APP_ROUTE, KeyPath
from gateway.dial import TunnelDialer, UpstreamProxy
from gateway.errors import Code, GatewayError, Reason
from gateway.exposure import Notice, exposure_notices
from gateway.forward import Forwarder
from gateway.http_client import ClientSettings, HttpClient
from gateway.logs import get_logger
from gateway.policy.allowlist import Allowlist
from gateway.policy.external_url import ExternalUrl
from gateway.policy.forward_proxy import ForwardProxyPolicy
from gateway.policy.paths import PathGlobs
from gateway.policy.proxyauth import ProxyAuth, ScryptHash
from gateway.policy.ratelimit import LimitSpec, RateLimiter, RateLimitSettings
from gateway.policy.ratestore import NO_OBSERVER, StorageObserver, StorageOptions, StorageUnusable
from gateway.policy.routes import RouteTable, RouteTarget
from gateway.policy.urlrewrite import RewriteLimits, RewritePolicy
from gateway.pool import UpstreamPool
from gateway.relay import Relay
from gateway.response_rewrite import ResponseRewrite
from gateway.steps import SizeLimits
from gateway.upstream import EgressGuard, EgressResolver, build_session, tls_context

T = TypeVar("T")


log = get_logger("gateway.generation")


class BuildError(Exception):
    """A config that validates but cannot be built (a long rewrite rule, an unreadable CA file, ...)."""

    def __init__(self, key: KeyPath, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def _built(key: KeyPath, factory: Callable[[], T]) -> T:
    """Run one build step; a failure becomes a BuildError naming the config key it came from."""
    try:
        return factory()
    except (ValueError, ConfigurationError) as exc:
        raise BuildError(key, str(exc)) from None


def rate_limit_settings(config: GatewayConfig) -> RateLimitSettings:
    """The limiter's settings: the global limit plus per-route overrides (`max_requests: 0` is off)."""
    rl = config.rate_limit
    default = LimitSpec(rl.max_requests, rl.window_s, rl.on_limit, rl.max_delay_s, rl.max_queued)
    routes: dict[str, LimitSpec | None] = {}
    for route in config.routes:
        override = route.rate_limit
        if override is not None:
            given = {k: v for k, v in override.model_dump().items() if v is not None}
            if "window_minutes" in given:
                given["window_s"] = round(given.pop("window_minutes") * 60)
            routes[route.name] = replace(default, **given)
    return RateLimitSettings(
        default=default,
        routes=routes,
        strategy=rl.strategy,
        storage=rl.storage,
        storage_options=StorageOptions(rl.storage_password, rl.storage_ca_bundle),
        on_storage_error=rl.on_storage_error,
        storage_timeout_ms=rl.storage_timeout_ms,
        anonymous=rl.anonymous,
    )


def tunnel_limit_settings(config: GatewayConfig) -> RateLimitSettings:
    """New tunnels per client address: the same limiter, in process memory (it guards this process)."""
    rate = config.forward_proxy.rate_limit
    return RateLimitSettings(default=LimitSpec(rate.max_tunnels, rate.window_s))


def rewrite_policy(config: GatewayConfig) -> RewritePolicy:
    """Built-in rules (app upstream -> public_url), then the config's extra rules, then advertised routes."""
    static: list[tuple[str, str]] = []
    app = config.route("app")
    if app is not None:
        static.append((app.upstream, config.public_url))
    static += [(rule.from_, rule.to) for rule in config.rewrite.rules]
    advertised = tuple((str(URL(r.upstream).origin()), r.prefix) for r in config.routes if r.advertise)
    rw = config.rewrite
    limits = RewriteLimits(rw.max_growth_ratio, int(rw.max_decoded_mb * 2**20), rw.max_inflate_ratio)
    return RewritePolicy(tuple(static), advertised, rw.max_buffer_kb * 1024, limits)


def _limiter(
    settings: RateLimitSettings, previous: RateLimiter | None, observer: StorageObserver
) -> RateLimiter:
    """A limiter that takes over the previous generation's store when it is the same one, and always its
    queues of delayed requests (one line per key across reloads, first come first served).

    Counters are keyed by route, key and limit, so across a reload a limit left unchanged keeps counting
    where it was, and a changed one starts afresh.
    """
    storage = None
    old = previous.settings if previous is not None else None
    if old is not None and (old.storage, old.storage_options) == (settings.storage, settings.storage_options):
        storage = previous.storage if previous is not None else None  # moves once the generation is built
    queues = previous.queues if previous is not None else None
    return RateLimiter(settings, storage=storage, observer=observer, queues=queues)


async def _storage_down(limiter: RateLimiter) -> BaseException | None:
    """The start-up check of a shared store: why it is unreachable now (then requests are decided by
    `on_storage_error` until it answers), or None; a store that answers but cannot serve is a BuildError."""
    try:
        down = await limiter.check_storage()
    except StorageUnusable as exc:
        raise BuildError(("rate_limit", "storage"), str(exc)) from None
    if down is not None:
        limiter.storage.health.down_at_start()
    return down


def limited_hosts(config: GatewayConfig) -> dict[str, tuple[str, str]]:
    """Upstream host -> (route name, prefix) for every route with a rate limit in force."""
    settings = rate_limit_settings(config)
    hosts: dict[str, tuple[str, str]] = {}
    for route in config.routes:
        spec = settings.routes.get(route.name, settings.default)
        host = URL(route.upstream).host
        if spec is not None and spec.max_requests > 0 and host is not None:
            hosts.setdefault(host, (route.name, route.prefix))
    return hosts


def delays_outlasting_shutdown(config: GatewayConfig) -> list[Notice]:
    """`on_limit: delay` waits longer than a shutdown lasts: one notice per `max_delay_s` key at fault.

    At shutdown a request still waiting is answered 503 `shutting_down` with Retry-After (never a cut
    connection), so with such a wait some requests an SDK would see served are refused and retried.
    """
    timeout, settings = config.shutdown_timeout_s, rate_limit_settings(config)
    routes: dict[KeyPath, list[str]] = {}
    for index, route in enumerate(config.routes):
        spec = settings.routes.get(route.name, settings.default)
        if spec is None or spec.max_requests <= 0 or spec.on_limit != "delay" or spec.max_delay_s <= timeout:
            continue
        own = route.rate_limit is not None and route.rate_limit.max_delay_s is not None
        key: KeyPath = (
            ("routes", index, "rate_limit", "max_delay_s") if own else ("rate_limit", "max_delay_s")
        )
        routes.setdefault(key, []).append(route.name)
    notices = []
    for key, names in routes.items():
        delay = settings.routes.get(names[0], settings.default)
        assert delay is not None
        detail = (
            f"on_limit: delay holds a request up to {delay.max_delay_s:g} s, longer than shutdown_timeout_s "
            f"({timeout:g} s): at shutdown the requests still waiting get 503 shutting_down with "
            f"Retry-After (routes: {', '.join(names)}); lower max_delay_s or raise shutdown_timeout_s"
        )
        notices.append(Notice("delay_outlasts_shutdown", key, detail, {"routes": names}))
    return notices


def reverse_only(config: GatewayConfig) -> dict[str, GatewayError]:
    """With `tunnel_to_limited_hosts: deny`, the 403 each limited host's tunnel gets, naming the way in.

    Tunnel clients show the user the status line only (`Tunnel connection failed: 403 ...`), so the
    way in is its reason phrase too: `403 Use BRAINTRUST_APP_URL=<the gateway's app route>`.
    """
    if config.forward_proxy.tunnel_to_limited_hosts == "allow":
        return {}
    app = config.route(APP_ROUTE)
    scheme = "https" if config.listen.tls is not None else "http"
    gateway = config.advertise_url or f"{scheme}://{config.listen.host}:{config.listen.port}"
    url = gateway + (app.prefix.rstrip("/") if app is not None else "")
    refusals = {}
    for host, (name, _) in limited_hosts(config).items():
        refusals[host] = GatewayError(
            Code.USE_REVERSE_MODE,
            f"{host} is served by the rate-limited route {name!r}: set BRAINTRUST_APP_URL={url} "
            "instead of tunnelling through HTTPS_PROXY",
            reason=Reason.USE_REVERSE_MODE,
            phrase=f"Use BRAINTRUST_APP_URL={url}",
        )
    return refusals


def report_modes(config: GatewayConfig) -> Modes:
    """Report or enforce, per route (its own `mode`, else the top-level one) and for the rest."""
    reported = frozenset(config.reported_routes)
    return Modes(config.mode == "report", {r.name: r.name in reported for r in config.routes})


def _proxy_auth(config: GatewayConfig, previous: ProxyAuth | None) -> ProxyAuth | None:
    """With `previous`, its failed-login counts go on: a reload (or SIGHUP) must not reset them."""
    auth = config.forward_proxy.auth
    if auth is None:
        return None
    users = {n: ScryptHash.parse(h) for n, h in auth.users.items()}
    failures = previous.failures if previous is not None else None
    return ProxyAuth(users, auth.max_failures_per_minute, failures=failures)


def _relay(config: GatewayConfig) -> Relay | None:
    """The signed-URL relay, when `relay.allow_hosts` names at least one object-store host."""
    settings = config.relay
    if not settings.allow_hosts:
        return None
    secret = settings.secret.encode() if settings.secret else None
    return Relay(Allowlist.parse(settings.allow_hosts), secret, settings.max_ttl_s)


def _response_rewrite(config: GatewayConfig, relay: Relay | None) -> ResponseRewrite | None:
    if not config.rewrite.enabled:
        return None
    policy = _built(("rewrite",), lambda: rewrite_policy(config))
    return ResponseRewrite(
        policy,
        ExternalUrl(config.advertise_url, config.trusted_proxies),
        PathGlobs(config.rewrite.body_paths),
        frozenset(r.name for r in config.routes if r.advertise),
        relay,
    )


def _audit(config: GatewayConfig) -> Audit | None:
    if not config.audit.enabled:
        return None
    sink = _built(("audit", "sink"), lambda: AuditSink(config.audit.sink))
    return Audit(sink, config.audit.expose_to_client)


class Generation:
    """Everything one config builds, closed together. Only its count of requests in flight changes."""

    def __init__(
        self,
        *,
        config: GatewayConfig,
        http: Chain,
        connect: Chain,
        forwarder: Forwarder,
        dialer: TunnelDialer | None,
        resolver: EgressResolver,
        limiter: RateLimiter,
        tunnel_limiter: RateLimiter,
        proxy_auth: ProxyAuth | None,
        storage_down: BaseException | None = None,
    ) -> None:
        self.config = config
        self.http = http
        self.connect = connect
        self.forwarder = forwarder
        self.audit: Audit | None = forwarder.audit  # read as every request ends
        self.dialer = dialer  # None when forward-proxy mode is off
        self.resolver = resolver
        self.limiter = limiter
        self.tunnel_limiter = tunnel_limiter
        self.proxy_auth = proxy_auth
        self.storage_down = storage_down  # the rate-limit store was unreachable when this was built
        self._in_flight = 0
        self._served = 0
        self._retired = False
        self._closing: asyncio.Task[None] | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        return self.forwarder.session

    @classmethod
    async def build(
        cls,
        config: GatewayConfig,
        previous: Generation | None = None,
        observer: StorageObserver = NO_OBSERVER,
    ) -> Generation:
        """Build every part (the session needs a running loop); raise BuildError on the first fault.

        With `previous`, rate-limit stores that did not change are taken over, counters and all.
        """
        relay = _relay(config)
        rewrite = _response_rewrite(config, relay)
        tls = _built(("upstream", "ca_bundle"), lambda: tls_context(config.upstream.ca_bundle))
        audit = _audit(config)
        limiter = _built(
            ("rate_limit", "storage"),
            lambda: _limiter(rate_limit_settings(config), previous.limiter if previous else None, observer),
        )
        storage_down = None
        if previous is None or limiter.storage is not previous.limiter.storage:
            try:  # a new store is checked; one taken over is serving already (its health says how)
                storage_down = await _storage_down(limiter)
            except BuildError:
                await limiter.close()  # refused: its connections go
                raise
        tunnel_limiter = _limiter(
            tunnel_limit_settings(config), previous.tunnel_limiter if previous else None, NO_OBSERVER
        )
        allowlist = Allowlist.parse(config.allowlist)
        fp, limits = config.forward_proxy, config.limits
        forward_proxy = (
            ForwardProxyPolicy(allowlist, fp.connect_ports, fp.deny_private_addresses) if fp.enabled else None
        )
        proxy_auth = _proxy_auth(config, previous.proxy_auth if previous else None)
        proxy_host = URL(config.upstream.proxy).host if config.upstream.proxy else None
        report = config.mode == "report"  # off-list destinations reach public addresses only (upstream.py)
        guard = EgressGuard(allowlist, frozenset({proxy_host} if proxy_host else ()), report)
        resolver = EgressResolver(guard, config.resolve)
        dialer = None
        if forward_proxy is not None:
            proxy = UpstreamProxy.parse(config.upstream.proxy)
            dialer = TunnelDialer(forward_proxy, resolver, config.upstream.connect_timeout_s, tls, proxy)
        modes = report_modes(config)
        size_limits = SizeLimits(limits.max_header_kb * 1024, int(limits.max_body_mb * 2**20))
        http = http_chain(
            limits=size_limits,
            public_url=config.public_url,
            routes=RouteTable(
                tuple(RouteTarget.from_url(r.name, r.prefix, r.upstream) for r in config.routes)
            ),
            allowlist=allowlist,
            forward_proxy=fp.enabled,
            http_ports=fp.http_ports,
            proxy_auth=proxy_auth,
            deny=path_deny_lists(config.deny_paths, {r.name: r.deny_paths for r in config.routes}),
            limiter=limiter,
            relay=relay,
            modes=modes,
        )
        connect = connect_chain(
            limits=size_limits,
            policy=forward_proxy,
            allowlist=allowlist,
            proxy_auth=proxy_auth,
            tunnel_limiter=tunnel_limiter,
            reverse_only=reverse_only(config),
            modes=modes,
        )
        client = None
        if config.upstream.proxy is None:
            header_bytes = limits.max_header_kb * 1024
            settings = ClientSettings(
                config.upstream.connect_timeout_s,
                config.upstream.read_timeout_s,
                config.upstream.write_timeout_s,
                header_bytes,
                header_bytes,
                limits.max_connections,
            )
            client = HttpClient(guard, resolver, tls, settings)
        forwarder = Forwarder(
            session=build_session(config, guard, resolver, tls),
            client=client,
            pool=UpstreamPool(
                limits.max_connections, config.upstream.pool_timeout_s, limits.max_upstream_share
            ),
            max_body=int(limits.max_body_mb * 2**20),
            body_timeout_s=limits.body_timeout_s,
            proxy=config.upstream.proxy,
            rewrite=rewrite,
            audit=audit,
            vet=forward_proxy.check_address if forward_proxy and forward_proxy.checks_addresses else None,
        )
        if previous is not None:  # nothing below can fail: hand the stores over
            for old, new in ((previous.limiter, limiter), (previous.tunnel_limiter, tunnel_limiter)):
                if new.storage is old.storage:
                    old.hand_over_storage()
        return cls(
            config=config,
            http=http,
            connect=connect,
            forwarder=forwarder,
            dialer=dialer,
            resolver=resolver,
            limiter=limiter,
            tunnel_limiter=tunnel_limiter,
            proxy_auth=proxy_auth,
            storage_down=storage_down,
        )

    def warnings(self) -> list[Notice]:
        """What an operator should know about this config: logged at start and at each reload by `serve`,
        printed by `check-config`."""
        config = self.config
        notices = exposure_notices(config)
        fp = config.forward_proxy
        hosts = sorted(limited_hosts(config))
        if fp.enabled and fp.tunnel_to_limited_hosts == "allow" and hosts:
            detail = (
                "tunnels to these hosts are not counted per token (tunnel_to_limited_hosts: deny refuses "
                f"them): {', '.join(hosts)}"
            )
            key = ("forward_proxy", "tunnel_to_limited_hosts")
            notices.append(Notice("tunnels_bypass_rate_limit", key, detail, {"hosts": hosts}))
        if self.storage_down is not None:
            mode = config.rate_limit.on_storage_error
            detail = (
                f"unreachable now ({type(self.storage_down).__name__}): requests are decided by "
                f"on_storage_error: {mode} until it answers"
            )
            notices.append(Notice("rate_limit_storage_unavailable", ("rate_limit", "storage"), detail))
        return notices + delays_outlasting_shutdown(config)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def enter(self) -> None:
        """A request (or tunnel) starts on this generation."""
        self._in_flight += 1
        self._served += 1

    def leave(self) -> None:
        """A request ends; the last one out of a retired generation closes it."""
        self._in_flight -= 1
        if self._retired and self._in_flight == 0:
            self._close_soon()

    def retire(self) -> None:
        """A newer generation serves new requests; close this one once its requests are done."""
        self._retired = True
        if self._in_flight == 0:
            self._close_soon()

    def _close_soon(self) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close_retired())

    async def _close_retired(self) -> None:
        await self.close()
        log.info("generation_closed", requests_served=self._served)

    @property
    def is_closed(self) -> bool:
        return self._closing is not None and self._closing.done()

    async def closed(self) -> None:
        """Wait until a retired generation has closed."""
        if self._closing is not None:
            await self._closing

    async def close(self) -> None:
        """Release connections (upstream pool, rate-limit store) and threads; counters are left alone."""
        if self.forwarder.client is not None:
            await self.forwarder.client.close()
        await self.session.close()
        await self.resolver.close()
        await self.limiter.close()
        await self.tunnel_limiter.close()
        if self.proxy_auth is not None:
            self.proxy_auth.close()
        if self.audit is not None:
            self.audit.sink.close()
