"""Per-token sliding-window rate limiting (Braintrust's OUTBOUND_RATE_LIMIT_* contract).

The key is the sha256 of the caller's token (never the token); each route counts separately. The default
strategy, moving-window, is exact: no interval of one window ever holds more than `max_requests` allowed
requests; it runs on our own stores (`policy/windows.py`: O(1) in memory, one round trip to Redis).
The other strategies, and every storage URI, are the `limits` library's. Every Redis call is bounded by
`storage_timeout_ms`; a dead store fails open or closed as configured, visibly while it lasts
(`policy/ratestore.py`), and limiting resumes by itself when the store comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, NamedTuple

from limits import RateLimitItemPerSecond
from limits.aio.strategies import FixedWindowRateLimiter, SlidingWindowCounterRateLimiter

from gateway.errors import Code, GatewayError
from gateway.policy.ratestore import (
    CHECK_TIMEOUT_S,
    NO_OBSERVER,
    RateStore,
    StorageObserver,
    StorageOptions,
    StorageUnusable,
)
from gateway.policy.windows import MemoryWindows

_STRATEGIES: dict[str, Any] = {  # the moving window runs on our own stores (policy/windows.py)
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
}
POLICY_NAME = "default"


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """`max_requests` per `window_s` seconds; 0 requests means no limit.

    `on_limit: delay` holds a request over the limit until the window frees a slot (nginx's `limit_req`
    with a burst), for at most `max_delay_s` and with at most `max_queued` waiting per key; else 429.
    """

    max_requests: int
    window_s: int
    on_limit: Literal["reject", "delay"] = "reject"
    max_delay_s: float = 30.0
    max_queued: int = 100


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """Everything the limiter needs, already validated by the config model."""

    default: LimitSpec
    routes: Mapping[str, LimitSpec | None] = field(default_factory=dict)  # None: `off` for that route
    strategy: Literal["moving-window", "sliding-window-counter", "fixed-window"] = "moving-window"
    storage: str = "memory://"
    storage_options: StorageOptions = field(default_factory=StorageOptions)
    on_storage_error: Literal["allow", "deny"] = "allow"
    storage_timeout_ms: int = 100
    anonymous: Literal["client-ip", "deny"] = "client-ip"


class RateDecision(NamedTuple):
    """The outcome for one request: `outcome` is what the access log records.

    A tuple, not a frozen dataclass: one is built per request, and a tuple is built in one step.
    """

    allowed: bool
    outcome: str
    headers: tuple[tuple[str, str], ...] = ()
    error: GatewayError | None = None
    wait_s: float = 0.0  # for a refusal: until the oldest counted request leaves the window


# A RateDecision built in C (tuple.__new__), not through the named tuple's Python `__new__`.
_Fields = tuple[tuple[str, str], ...]
_decided: Callable[[tuple[bool, str, _Fields, GatewayError | None, float]], RateDecision] = partial(
    tuple.__new__, RateDecision
)


class RatePeek(NamedTuple):
    """What the limiter would decide for one request, read without counting it (`bt-gateway explain`)."""

    decision: RateDecision
    key: str | None  # the storage key (`tok:<sha256>` or `ip:<addr>`); None when no key was needed
    in_window: int | None  # requests in the window now; None when not read (no limit, or the store failed)
    spec: LimitSpec | None  # None: the route has no limit


OFF = RateDecision(allowed=True, outcome="off")
FAIL_OPEN = RateDecision(allowed=True, outcome="storage_error_allow")
ANONYMOUS_DENIED = RateDecision(
    allowed=False,
    outcome="anonymous_denied",
    error=GatewayError(Code.UNAUTHENTICATED, "an Authorization token is required"),
)


@dataclass(frozen=True, slots=True)
class _Limit:
    """A LimitSpec made ready for the hot path: the `limits` item and the constant header."""

    item: Any
    policy_field: tuple[str, str]  # the constant RateLimit-Policy header
    amount: int
    spec: LimitSpec
    scope: str  # the key prefix in our windows: a changed limit counts afresh, as in `limits`
    window_s: int


class _Waiters:
    """The requests of one key waiting for a slot: first come, first served, at most `max_queued`."""

    __slots__ = ("count", "turn")

    def __init__(self) -> None:
        self.count = 0
        self.turn = asyncio.Lock()  # FIFO: the head of the line waits for the window, the rest for it


class DelayQueues:
    """Every line of requests waiting for a slot (`on_limit: delay`), one per route and key.

    Outlives a reload: each generation's limiter is handed the same queues, so a reload neither opens a
    second line per key (doubling `max_queued`) nor lets requests that came after it overtake the ones
    already waiting. Whatever the limits become, a key has one line, bounded by the newest `max_queued`.
    """

    __slots__ = ("_lines", "_stopped", "waiting")

    def __init__(self) -> None:
        self._lines: dict[tuple[str, str], _Waiters] = {}
        self._stopped = asyncio.Event()
        self.waiting = 0  # requests in every line now (a gauge)

    @property
    def stopping(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        """The gateway stops: every request waiting (and any that would) is answered 503 at once, with
        Retry-After, rather than held until the shutdown deadline cuts its connection."""
        self._stopped.set()

    async def pause(self, seconds: float) -> bool:
        """Wait `seconds`, or less if the gateway begins to stop meanwhile: whether it still runs."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopped.wait()
        return not self._stopped.is_set()

    def has_line(self, scope: tuple[str, str]) -> bool:
        """Whether requests of `scope` wait now: a newcomer then queues behind them, never overtakes."""
        return scope in self._lines

    def join(self, scope: tuple[str, str], max_queued: int) -> _Waiters | None:
        """The line for `scope` with one more place taken, or None when it is full."""
        line = self._lines.get(scope)
        if line is None:
            line = self._lines[scope] = _Waiters()
        if line.count >= max_queued:
            return None
        line.count += 1
        self.waiting += 1
        return line

    def leave(self, scope: tuple[str, str], line: _Waiters) -> None:
        """A place is given back (served, refused or gone); an empty line is dropped."""
        line.count -= 1
        self.waiting -= 1
        if not line.count:
            del self._lines[scope]


def _shutting_down(refused: RateDecision) -> RateDecision:
    """503 for a request that waited for a slot when the gateway began to stop; Retry-After says when
    the window frees one (a replica sharing the limit may serve it then)."""
    retry = str(max(1, math.ceil(refused.wait_s)))
    error = GatewayError(Code.SHUTTING_DOWN, "the gateway is shutting down", (("Retry-After", retry),))
    return refused._replace(outcome="shutting_down", error=error)


def rate_key(digest: str | None, client_ip: str, anonymous: str) -> str | GatewayError:
    """Storage key: `tok:<sha256 of the token>`, or `ip:<addr>` without one; 401 when anonymous is denied.

    Takes the digest, not the token, so the one sha256 per request also serves the log fingerprint.
    """
    if digest is not None:
        return "tok:" + digest
    if anonymous == "deny":
        return GatewayError(Code.UNAUTHENTICATED, "an Authorization token is required")
    return "ip:" + client_ip


class RateLimiter:
    """Checks and counts one request against its route's limit; shared by every request of a process."""

    def __init__(
        self,
        settings: RateLimitSettings,
        clock: Callable[[], float] = time.time,
        *,
        storage: RateStore | None = None,
        observer: StorageObserver = NO_OBSERVER,
        queues: DelayQueues | None = None,
    ) -> None:
        """`storage`: a store taken over from an earlier limiter (see `hand_over_storage`), else a new one
        whose health `observer` exports (the metrics). `queues`: an earlier limiter's waiting requests,
        which this one keeps in line (see `DelayQueues`)."""
        self.settings = settings
        self._clock = clock
        self._timeout = settings.storage_timeout_ms / 1000
        self._store = storage or RateStore(settings.storage, clock, settings.storage_options, observer)
        self._owns_storage = True
        strategy = _STRATEGIES.get(settings.strategy)  # None: the moving window, on our own stores
        self._strategy = strategy(self._store.limits) if strategy is not None else None
        self._default = self._compile(settings.default)
        self._routes = {name: self._compile(spec) for name, spec in settings.routes.items()}
        self.queues = queues if queues is not None else DelayQueues()

    @staticmethod
    def _compile(spec: LimitSpec | None) -> _Limit | None:
        if spec is None or spec.max_requests <= 0:
            return None
        item = RateLimitItemPerSecond(spec.max_requests, spec.window_s)
        header = f'"{POLICY_NAME}";q={spec.max_requests};w={spec.window_s}'
        scope = f"{spec.max_requests}/{spec.window_s}/"
        return _Limit(
            item=item,
            policy_field=("RateLimit-Policy", header),
            amount=spec.max_requests,
            spec=spec,
            scope=scope,
            window_s=spec.window_s,
        )

    @property
    def shared(self) -> bool:
        """Whether counters live outside this process (so their store can be down)."""
        return self.settings.storage != "memory://"

    async def decide(self, route: str, digest: str | None, client_ip: str) -> RateDecision:
        """The decision for one request: a route without a limit needs no key, so no token either."""
        limit = self._routes.get(route, self._default)
        if limit is None:
            return OFF
        key = rate_key(digest, client_ip, self.settings.anonymous)
        if isinstance(key, GatewayError):
            return ANONYMOUS_DENIED
        delay = limit.spec if limit.spec.on_limit == "delay" else None
        if delay is not None and self.queues.has_line((route, key)):
            return await self._wait_for_slot(route, key, delay, None)  # behind those already waiting
        decision = await self.check(route, key)
        if decision.outcome != "deny" or delay is None:
            return decision
        return await self._wait_for_slot(route, key, delay, decision)

    async def _wait_for_slot(
        self, route: str, key: str, spec: LimitSpec, refused: RateDecision | None
    ) -> RateDecision:
        """Hold the request until the moving window frees a slot; 429 past `max_delay_s` or a full queue.

        A client that leaves while waiting is cancelled here, and its place is freed by the `finally`.
        """
        scope, queues = (route, key), self.queues
        waiters = None if queues.stopping else queues.join(scope, spec.max_queued)
        if waiters is None:
            if refused is None:  # it came to join a line that is full (or the stop began): decide now
                refused = await self.check(route, key)
                if refused.outcome != "deny":
                    return refused
            return _shutting_down(refused) if queues.stopping else refused._replace(outcome="queue_full")
        deadline = self._clock() + spec.max_delay_s
        try:
            async with waiters.turn:
                decision = await self.check(route, key)  # the one ahead may have taken the slot
                while decision.outcome == "deny":
                    if queues.stopping:
                        return _shutting_down(decision)
                    if self._clock() + decision.wait_s > deadline:
                        return decision._replace(outcome="delay_too_long")
                    if not await queues.pause(decision.wait_s):
                        return _shutting_down(decision)
                    decision = await self.check(route, key)
                return decision._replace(outcome="delayed") if decision.allowed else decision
        finally:
            queues.leave(scope, waiters)

    @property
    def immediate(self) -> bool:
        """Whether every decision is made without awaiting: the moving window in process memory, and no
        route holds requests for a slot. Then `decide_now` serves, with no coroutine per request."""
        if self._strategy is not None or not isinstance(self._store.windows, MemoryWindows):
            return False
        limits = (self._default, *self._routes.values())
        return not any(limit is not None and limit.spec.on_limit == "delay" for limit in limits)

    def decide_now(self, route: str, digest: str | None, client_ip: str) -> RateDecision:
        """`decide`, for a limiter that is `immediate`."""
        limit = self._routes.get(route, self._default)
        if limit is None:
            return OFF
        key = rate_key(digest, client_ip, self.settings.anonymous)
        if isinstance(key, GatewayError):
            return ANONYMOUS_DENIED
        return self._count_in_memory(limit, route, key)

    def _count_in_memory(self, limit: _Limit, route: str, key: str) -> RateDecision:
        windows = self._store.windows
        assert isinstance(windows, MemoryWindows)
        return self._decision(
            limit, *windows.hit_now(f"{route}/{limit.scope}{key}", limit.amount, limit.window_s)
        )

    async def check(self, route: str, key: str) -> RateDecision:
        """Count the request under `key` if allowed; refuse with an exact Retry-After if not."""
        limit = self._routes.get(route, self._default)
        if limit is None:
            return OFF
        if self._strategy is None and isinstance(self._store.windows, MemoryWindows):  # no I/O, no timeout
            return self._count_in_memory(limit, route, key)
        try:
            async with asyncio.timeout(self._timeout):
                allowed, remaining, reset = await self._window(limit, route, key)
        except Exception as exc:  # any store failure or timeout: decided by on_storage_error
            return self._storage_failed(exc)
        self._storage_ok()
        return self._decision(limit, allowed, remaining, reset)

    async def peek(self, route: str, digest: str | None, client_ip: str) -> RatePeek:
        """`decide` read only: the same key, limit and outcome, but nothing is counted, queued or logged.

        Over the limit with `on_limit: delay`, the outcome is `delayed` (it would wait, then go on) or
        `delay_too_long`; how many others wait in this process is not known to a reader.
        """
        limit = self._routes.get(route, self._default)
        if limit is None:
            return RatePeek(OFF, None, None, None)
        key = rate_key(digest, client_ip, self.settings.anonymous)
        if isinstance(key, GatewayError):
            return RatePeek(ANONYMOUS_DENIED, None, None, limit.spec)
        return await self.peek_key(route, key)

    async def peek_key(self, route: str, key: str) -> RatePeek:
        """`check` read only (see `peek`)."""
        limit = self._routes.get(route, self._default)
        if limit is None:
            return RatePeek(OFF, key, None, None)
        try:
            async with asyncio.timeout(self._timeout):
                allowed, remaining, reset = await self._window(limit, route, key, count=False)
        except Exception:
            return RatePeek(self._failed(), key, None, limit.spec)
        decision = self._decision(limit, allowed, remaining - 1 if allowed else remaining, reset)
        spec = limit.spec
        if not allowed and spec.on_limit == "delay":
            if decision.wait_s > spec.max_delay_s:
                decision = decision._replace(outcome="delay_too_long")
            else:
                decision = decision._replace(allowed=True, outcome="delayed", error=None)
        return RatePeek(decision, key, limit.amount - remaining, spec)

    def _decision(self, limit: _Limit, allowed: bool, remaining: int, reset: float) -> RateDecision:
        seconds = max(0, math.ceil(reset - self._clock()))
        headers = (limit.policy_field, ("RateLimit", f'"{POLICY_NAME}";r={max(0, remaining)};t={seconds}'))
        if allowed:  # most requests: built in C
            return _decided((True, "allow", headers, None, 0.0))
        retry = max(1, seconds)
        error = GatewayError(
            Code.RATE_LIMITED,
            f"rate limit of {limit.amount} requests per {limit.item.get_expiry()} s exceeded",
            (("Retry-After", str(retry)), *headers),
        )
        wait = max(0.0, reset - self._clock())
        return RateDecision(allowed=False, outcome="deny", headers=headers, error=error, wait_s=wait)

    async def _window(
        self, limit: _Limit, route: str, key: str, *, count: bool = True
    ) -> tuple[bool, int, float]:
        """(allowed, remaining, reset) from the store. `count=False` (`explain`): read only, and
        `remaining` is before this request."""
        strategy = self._strategy
        if strategy is None:
            windows = self._store.windows
            ask = windows.hit if count else windows.peek
            hit = await ask(f"{route}/{limit.scope}{key}", limit.amount, limit.window_s)
            return hit.allowed, hit.remaining, hit.reset
        allowed = await (strategy.hit if count else strategy.test)(limit.item, route, key)
        reset, remaining = await strategy.get_window_stats(limit.item, route, key)
        return bool(allowed), int(remaining), float(reset)

    def _storage_failed(self, exc: BaseException) -> RateDecision:
        self._store.health.failed(exc, self.settings.on_storage_error, decided=True)
        return self._failed()

    def _failed(self) -> RateDecision:
        """The decision while the store fails: `on_storage_error` says allow or deny."""
        if self.settings.on_storage_error == "allow":
            return FAIL_OPEN
        error = GatewayError(Code.RATE_LIMIT_UNAVAILABLE, "rate limit storage is unavailable")
        return RateDecision(allowed=False, outcome="storage_error_deny", error=error)

    def _storage_ok(self) -> None:
        self._store.health.ok()

    async def readiness(self, *, counted: bool = True) -> Literal["ready", "degraded", "unavailable"]:
        """`ready`, or while a shared store is down: `degraded` (failing open) or `unavailable` (closed).

        Asks the store (bounded by `storage_timeout_ms`), so a load balancer and an operator see an outage
        even when no request has hit it yet; it is reported as for requests.
        """
        if not self.shared:
            return "ready"
        try:
            error = await self._store.check(self._timeout)
        except StorageUnusable as exc:  # it answers, wrongly: as down for requests (they fail the same way)
            error = exc
        if error is None:
            self._storage_ok()
            return "ready"
        self._store.health.failed(error, self.settings.on_storage_error, decided=False, counted=counted)
        return "degraded" if self.settings.on_storage_error == "allow" else "unavailable"

    async def check_storage(self) -> BaseException | None:
        """At start-up: None, or why the store is unreachable now; raises StorageUnusable if it cannot
        serve at all (see `RateStore.check`)."""
        if not self.shared:
            return None
        return await self._store.check(max(self._timeout, CHECK_TIMEOUT_S))

    async def storage_up(self) -> bool:
        """Whether the store answers now (process memory always does), for the status page; an outage
        is reported as for requests, and counts no decision."""
        return await self.readiness(counted=False) == "ready"

    @property
    def storage(self) -> RateStore:
        return self._store

    def hand_over_storage(self) -> None:
        """A successor took this limiter's store (and its counters): this one will not close it."""
        self._owns_storage = False

    async def close(self) -> None:
        """Close storage connections only; counters in a shared store outlive this process."""
        if self.shared and self._owns_storage:
            self._store.disconnect()
