"""The order of the request steps, written once, here, as data (like Envoy's filter chain).

    HTTP:    limits -> method -> host -> credentials -> redirect -> route -> allowlist -> forward_proxy
             -> proxy_auth -> deny_paths -> ratelimit, then forward (terminal) -> rewrite -> response
    CONNECT: limits -> credentials -> connect -> forward_proxy (allow-list, ports, reverse-only
             hosts) -> proxy_auth -> tunnel_limit, then the tunnel (terminal)

The allow-list speaks before proxy auth, so a denied destination costs no password check. The runner
records every step's decision in the `Exchange` as `step:outcome`; the first error or reply ends the chain.

Report mode is the runner's, here, once: a refusal whose outcome its step lists as `relaxable`, on a
request whose route is in report mode (the top-level mode before a route is known), is recorded as
`step:would_refuse` and the chain goes on. No step knows the mode.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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

NEVER: frozenset[str] = frozenset()  # the `relaxable` of a step that declares none
RELAXED = "would_refuse"  # a step's verdict in `explain` when report mode let its refusal go


@dataclass(frozen=True, slots=True)
class Modes:
    """Which requests report instead of refusing: a route's own mode, else the top-level one."""

    report: bool = False  # the top-level mode: tunnels, and requests refused before a route is known
    by_route: Mapping[str, bool] = field(default_factory=dict)  # route name -> in report mode


ENFORCE = Modes()


class Chain:
    """Runs steps in order; stops at the first decision that refuses or answers.

    Only the steps that do I/O are awaited: which ones is known when the chain is built, so a request
    pays for no coroutine it does not need. Report mode costs a request nothing until a step refuses.
    """

    __slots__ = ("_by_route", "_plan", "_report", "steps")

    def __init__(self, steps: Sequence[Step | None], modes: Modes = ENFORCE) -> None:
        self.steps = tuple(step for step in steps if step is not None)  # None: not configured
        self._plan = tuple(
            (step, inspect.iscoroutinefunction(step.decide), getattr(step, "relaxable", NEVER))
            for step in self.steps
        )
        self._report = modes.report
        self._by_route = modes.by_route

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(step.name for step in self.steps)

    async def run(self, exchange: Exchange) -> Decision | None:
        """The decision that ends the request early, or None when it may go on to the terminal step."""
        for step, waits, relaxable in self._plan:
            decision: Any = step.decide(exchange)  # Decision | None, or an awaitable of one
            if waits:
                decision = await decision
            if decision is None:
                continue
            if decision.final:
                if self._relaxes(relaxable, decision, exchange):
                    exchange.relax(step.name, decision.error)
                    continue
                exchange.decisions.append(f"{step.name}:{decision.outcome}")
                return cast(Decision, decision)
            exchange.decisions.append(f"{step.name}:{decision.outcome}")
        return None

    async def trace(self, exchange: Exchange) -> list[tuple[str, Decision | None]]:
        """`run` for `bt-gateway explain`: each step reached, in order, with its decision (None: nothing to
        decide); the last one is final when the chain ended early. A step that counts is asked through
        its `peek`, so tracing changes no counter."""
        reached: list[tuple[str, Decision | None]] = []
        for step, _, relaxable in self._plan:
            ask = getattr(step, "peek", step.decide)  # `peek`: the same decision, counting nothing
            decision = ask(exchange)
            if inspect.isawaitable(decision):
                decision = await decision
            if decision is not None and decision.final and self._relaxes(relaxable, decision, exchange):
                exchange.relax(step.name, decision.error)  # report mode: as `run` does, on it goes
                reached.append((step.name, Decision(RELAXED, facts=decision.facts)))
                continue
            reached.append((step.name, decision))
            if decision is None:
                continue
            exchange.decisions.append(f"{step.name}:{decision.outcome}")
            if decision.final:
                break
        return reached

    def _relaxes(self, relaxable: frozenset[str], decision: Decision, exchange: Exchange) -> bool:
        """Report mode lets this refusal go: the step may relax it, and the route (or, before one is
        known, the top level) reports."""
        return decision.outcome in relaxable and self._by_route.get(exchange.route or "", self._report)


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
    modes: Modes = ENFORCE,
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
        ),
        modes,
    )


def connect_chain(
    *,
    limits: SizeLimits,
    policy: ForwardProxyPolicy | None,
    allowlist: Allowlist,
    proxy_auth: ProxyAuth | None,
    tunnel_limiter: RateLimiter,
    reverse_only: dict[str, GatewayError],
    modes: Modes = ENFORCE,
) -> Chain:
    return Chain(
        (
            limits,
            Credentials(),
            ConnectTargetParsed(),
            ConnectAllowed(policy, allowlist, reverse_only),
            ProxyAuthenticated(proxy_auth) if proxy_auth else None,
            TunnelLimited(tunnel_limiter),
        ),
        modes,
    )


def path_deny_lists(global_patterns: tuple[str, ...], per_route: dict[str, tuple[str, ...]]) -> DeniedPaths:
    """The deny-path step from config: one compiled list for every route, one per route that has its own."""
    routes = {name: PathDenyList(patterns) for name, patterns in per_route.items() if patterns}
    return DeniedPaths(PathDenyList(global_patterns), routes)
