"""One config's runtime, built whole: policies, limiters, egress guard, resolver and upstream session.

`check-config` builds one and closes it without opening a listener, so whatever `serve` would refuse at
start, `check-config` refuses first, with the key at fault. The server holds one generation at a time and a
request keeps the one it started with, so a later reload can swap the whole object at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
from limits.errors import ConfigurationError
from yarl import URL

from gateway.config.model import GatewayConfig
from gateway.config.overrides import KeyPath
from gateway.pipeline import Pipeline, rate_limit_settings, rewrite_policy, tunnel_limit_settings
from gateway.policy.ratelimit import RateLimiter
from gateway.tunnel import TunnelDialer, UpstreamProxy
from gateway.upstream import EgressGuard, EgressResolver, build_session, tls_context

T = TypeVar("T")


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


@dataclass(frozen=True, kw_only=True, slots=True)
class Generation:
    """Everything one config builds, closed together; never mutated after `build`."""

    config: GatewayConfig
    pipeline: Pipeline
    guard: EgressGuard
    resolver: EgressResolver
    session: aiohttp.ClientSession
    limiter: RateLimiter
    tunnel_limiter: RateLimiter
    dialer: TunnelDialer | None  # None when forward-proxy mode is off

    @classmethod
    async def build(cls, config: GatewayConfig) -> Generation:
        """Build every part (the session needs a running loop); raise BuildError on the first fault."""
        rewrite = _built(("rewrite",), lambda: rewrite_policy(config)) if config.rewrite.enabled else None
        pipeline = Pipeline(config, rewrite)
        proxy_host = URL(config.upstream.proxy).host if config.upstream.proxy else None
        guard = EgressGuard(pipeline.allowlist, frozenset({proxy_host} if proxy_host else ()))
        resolver = EgressResolver(guard, config.resolve)
        tls = _built(("upstream", "ca_bundle"), lambda: tls_context(config.upstream.ca_bundle))
        limiter = _built(("rate_limit", "storage"), lambda: RateLimiter(rate_limit_settings(config)))
        tunnel_limiter = RateLimiter(tunnel_limit_settings(config))
        session = build_session(config, guard, resolver, tls)
        dialer = None
        if pipeline.forward_proxy is not None:
            proxy = UpstreamProxy.parse(config.upstream.proxy)
            timeout = config.upstream.connect_timeout_s
            dialer = TunnelDialer(pipeline.forward_proxy, resolver, timeout, tls, proxy)
        return cls(
            config=config,
            pipeline=pipeline,
            guard=guard,
            resolver=resolver,
            session=session,
            limiter=limiter,
            tunnel_limiter=tunnel_limiter,
            dialer=dialer,
        )

    async def close(self) -> None:
        """Release connections (upstream pool, rate-limit store) and threads; counters are left alone."""
        await self.session.close()
        await self.resolver.close()
        await self.limiter.close()
        await self.tunnel_limiter.close()
        if self.pipeline.proxy_auth is not None:
            self.pipeline.proxy_auth.close()
