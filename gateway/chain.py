"""The order of the request steps, written once, here, as data (like Envoy's filter chain).

    HTTP:    limits -> method -> host -> credentials -> redirect -> route -> allowlist -> forward_proxy
             -> proxy_auth -> deny_paths -> ratelimit, then forward (terminal) -> rewrite -> response
    CONNECT: limits -> credentials -> connect -> forward_proxy (allow-list, ports, reverse-only
             hosts) -> proxy_auth -> tunnel_limit, then the tunnel (terminal)

The allow-list speaks before proxy auth, so a denied destination costs no password check. The runner
records every step's decision in the `Exchange` as `step:outcome`; the first error or reply ends the chain.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, cast

from gateway.errors import GatewayError
from gateway.exchange import Exchange
from gateway.policy.allowlist import Allowlist
from gateway.policy.forward_proxy import ForwardProxyPolicy
from gateway.policy.paths import PathDenyList
from gateway.policy.proxyauth import ProxyAuth
from gateway.policy.ratelimit import RateLimiter
from gateway.policy.routes import RouteTable
from gateway.relay import Relay
from gateway.steps import (
    Allowlisted,
    BrowserRedirect,
    ConnectAllowed,
    ConnectTargetParsed,
    Credentials,
    Decision,
    DeniedPaths,
    ForwardProxyMode,
    HostHeader,
    MethodAllowed,
    ProxyAuthenticated,
    Router,
    SizeLimits,
    Step,
    TunnelLimited,
    rate_limited,
)


class Chain:
    """Runs steps in order; stops at the first decision that refuses or answers.

    Only the steps that do I/O are awaited: which ones is known when the chain is built, so a request
    pays for no coroutine it does not need.
    """

    __slots__ = ("_plan", "steps")

    def __init__(self, steps: Sequence[Step | None]) -> None:
        self.steps = tuple(step for step in steps if step is not None)  # None: not configured
        self._plan = tuple((step, inspect.iscoroutinefunction(step.decide)) for step in self.steps)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(step.name for step in self.steps)

    async def run(self, exchange: Exchange) -> Decision | None:
        """The decision that ends the request early, or None when it may go on to the terminal step."""
        for step, waits in self._plan:
            decision: Any = step.decide(exchange)  # Decision | None, or an awaitable of one
            if waits:
                decision = await decision
            if decision is None:
                continue
            exchange.decisions.append(f"{step.name}:{decision.outcome}")
            if decision.final:
                return cast(Decision, decision)
        return None

    async def trace(self, exchange: Exchange) -> list[tuple[str, Decision | None]]:
        """`run` for `bt-gateway explain`: each step reached, in order, with its decision (None: nothing to
        decide); the last one is final when the chain ended early. A step that counts is asked through
        its `peek`, so tracing changes no counter."""
        reached: list[tuple[str, Decision | None]] = []
        for step in self.steps:
            ask = getattr(step, "peek", step.decide)  # `peek`: the same decision, counting nothing
            decision = ask(exchange)
            if inspect.isawaitable(decision):
                decision = await decision
            reached.append((step.name, decision))
            if decision is None:
                continue
            exchange.decisions.append(f"{step.name}:{decision.outcome}")
            if decision.final:
                break
        return reached


def http_chain(
    *,
    limits: SizeLimits,
    public_url: str,
    routes: RouteTable,
    allowlist: Allowlist,
    forward_proxy: bool,
    http_ports: tuple[int, ...],
    proxy_auth: ProxyAuth | None,
    deny: DeniedPaths,
    limiter: RateLimiter,
    relay: Relay | None,
) -> Chain:
    return Chain(
        (
            limits,
            MethodAllowed(),
            HostHeader(),
            Credentials(),
            BrowserRedirect(public_url),
            Router(routes, relay),
            Allowlisted(allowlist, routes),
            ForwardProxyMode(forward_proxy, http_ports),
            ProxyAuthenticated(proxy_auth) if proxy_auth else None,
            deny,
            rate_limited(limiter),
        )
    )


def connect_chain(
    *,
    limits: SizeLimits,
    policy: ForwardProxyPolicy | None,
    allowlist: Allowlist,
    proxy_auth: ProxyAuth | None,
    tunnel_limiter: RateLimiter,
    reverse_only: dict[str, GatewayError],
) -> Chain:
    return Chain(
        (
            limits,
            Credentials(),
            ConnectTargetParsed(),
            ConnectAllowed(policy, allowlist, reverse_only),
            ProxyAuthenticated(proxy_auth) if proxy_auth else None,
            TunnelLimited(tunnel_limiter),
        )
    )


def path_deny_lists(global_patterns: tuple[str, ...], per_route: dict[str, tuple[str, ...]]) -> DeniedPaths:
    """The deny-path step from config: one compiled list for every route, one per route that has its own."""
    routes = {name: PathDenyList(patterns) for name, patterns in per_route.items() if patterns}
    return DeniedPaths(PathDenyList(global_patterns), routes)
