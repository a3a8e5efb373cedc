"""The rate-limit policy without sockets: keys, headers, exact Retry-After, exactness as a property."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gateway.errors import Code, GatewayError
from gateway.policy.credentials import digest_of
from gateway.policy.ratelimit import LimitSpec, RateLimiter, RateLimitSettings, rate_key
from gateway.policy.windows import MemoryWindows, RedisWindows, WindowHit
from tests.clients import HANG_GUARD_S


class Clock:
    """A controlled clock, installed where the `limits` memory storage reads time."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def limiter(clock: Clock, **kwargs: Any) -> RateLimiter:
    kwargs.setdefault("default", LimitSpec(3, 60))
    return RateLimiter(RateLimitSettings(**kwargs), clock=clock.time)


def test_rate_key() -> None:
    digest = hashlib.sha256(b"tok-1").hexdigest()
    assert digest_of("Bearer tok-1") == digest_of("tok-1") == digest
    assert rate_key(digest, "10.0.0.1", "client-ip") == f"tok:{digest}"
    assert rate_key(digest, "10.0.0.1", "deny") == f"tok:{digest}"
    assert rate_key(digest_of(None), "10.0.0.1", "client-ip") == "ip:10.0.0.1"
    denied = rate_key(digest_of("Basic Zm9v"), "10.0.0.1", "deny")
    assert isinstance(denied, GatewayError) and denied.code is Code.UNAUTHENTICATED


async def test_headers_and_exact_retry_after(clock: Clock) -> None:
    rl = limiter(clock)
    outcomes = []
    for _ in range(4):
        outcomes.append(await rl.check("app", "tok:a"))
        clock.now += 10
    assert [d.outcome for d in outcomes] == ["allow", "allow", "allow", "deny"]
    assert outcomes[0].headers == (
        ("RateLimit-Policy", '"default";q=3;w=60'),
        ("RateLimit", '"default";r=2;t=60'),
    )
    assert outcomes[2].headers[1] == ("RateLimit", '"default";r=0;t=40')
    refused = outcomes[3]
    assert refused.error is not None and refused.error.code is Code.RATE_LIMITED
    # The oldest counted request (t=0) leaves the window at t=60; this refusal is at t=30.
    assert dict(refused.error.headers)["Retry-After"] == "30"
    clock.now += 0.5  # t=40.5 -> 19.5 s left, rounded up
    again = await rl.check("app", "tok:a")
    assert again.error is not None and dict(again.error.headers)["Retry-After"] == "20"
    clock.now = 1_000_000.0 + 60.001
    assert (await rl.check("app", "tok:a")).allowed  # the t=0 request left the window


async def test_retry_after_is_at_least_one_second(clock: Clock) -> None:
    rl = limiter(clock, default=LimitSpec(1, 60))
    assert (await rl.check("app", "k")).allowed
    clock.now += 59.9
    refused = await rl.check("app", "k")
    assert refused.error is not None and dict(refused.error.headers)["Retry-After"] == "1"


async def test_routes_count_separately_and_can_be_off(clock: Clock) -> None:
    rl = limiter(clock, default=LimitSpec(1, 60), routes={"data": None, "slow": LimitSpec(2, 60)})
    assert (await rl.check("app", "k")).allowed
    assert not (await rl.check("app", "k")).allowed
    assert (await rl.check("slow", "k")).allowed
    assert (await rl.check("slow", "k")).allowed
    assert not (await rl.check("slow", "k")).allowed
    for _ in range(10):
        decision = await rl.check("data", "k")
        assert decision.allowed and decision.outcome == "off" and decision.headers == ()
    assert (await rl.check("app", "other")).allowed  # tokens count separately too


async def test_zero_disables(clock: Clock) -> None:
    rl = limiter(clock, default=LimitSpec(0, 60))
    assert all([(await rl.check("app", "k")).outcome == "off" for _ in range(5)])


class SharedStore:
    """Stands in for a Redis store: the windows are awaited (and timed out), and can be made to fail."""

    def __init__(self, inner: MemoryWindows) -> None:
        self.inner = inner
        self.down: str | None = None  # "raise" or "hang"

    async def hit(self, key: str, limit: int, window: float) -> WindowHit:
        if self.down == "hang":
            await asyncio.sleep(3600)
        if self.down == "raise":
            raise ConnectionError("store down")
        return self.inner.hit_now(key, limit, window)


@pytest.mark.parametrize("failure", ["raise", "hang"])
async def test_store_failure_fails_open_or_closed_and_warns_once(clock: Clock, failure: str) -> None:
    opened = limiter(clock, on_storage_error="allow", storage_timeout_ms=20)
    closed = limiter(clock, on_storage_error="deny", storage_timeout_ms=20)
    stores = []
    for rl in (opened, closed):
        store = SharedStore(MemoryWindows(clock.time))
        rl.storage.windows = store  # type: ignore[assignment]
        store.down = failure
        stores.append(store)
    with capture_logs() as logs:
        for _ in range(5):
            assert (await opened.check("app", "k")).outcome == "storage_error_allow"
            refused = await closed.check("app", "k")
            assert refused.error is not None and refused.error.code is Code.RATE_LIMIT_UNAVAILABLE
        stores[0].down = None
        assert (await opened.check("app", "k")).outcome == "allow"
    events = [entry["event"] for entry in logs]
    assert events.count("rate_limit_storage_unavailable") == 2  # once per limiter, not per request
    assert events.count("rate_limit_storage_recovered") == 1


WINDOW = 10.0
LIMIT = 4


@settings(max_examples=150, deadline=None)
@given(gaps=st.lists(st.integers(min_value=0, max_value=4000), min_size=1, max_size=60))
def test_moving_window_is_exact(gaps: list[int]) -> None:
    """For random arrivals: no window-long interval holds more than LIMIT allowed requests, and no
    request is refused while fewer than LIMIT were allowed in its trailing window."""
    assert_exact(asyncio.run(run_arrivals(gaps)))


def assert_exact(decisions: list[tuple[float, bool]]) -> None:
    allowed_times = [t for t, ok in decisions if ok]
    for t, ok in decisions:
        in_window = sum(1 for a in allowed_times if t - WINDOW <= a <= t)
        assert in_window <= LIMIT  # (a) never more than LIMIT in any closed window ending at a request
        if not ok:
            assert in_window >= LIMIT, f"refused at {t} with only {in_window} allowed in the window"  # (b)
    for i, start in enumerate(allowed_times):
        assert sum(1 for a in allowed_times[i:] if a - start <= WINDOW) <= LIMIT


async def run_arrivals(
    gaps: list[int], storage: str = "memory://", key: str = "tok:x"
) -> list[tuple[float, bool]]:
    """Requests `gaps` milliseconds apart on a controlled clock; (time, allowed) for each."""
    fake = Clock()
    settings = RateLimitSettings(
        default=LimitSpec(LIMIT, int(WINDOW)), storage=storage, storage_timeout_ms=5000
    )
    rl = RateLimiter(settings, clock=fake.time)
    if isinstance(rl.storage.windows, RedisWindows):  # Redis's own time would not follow the fake clock
        client = rl.storage.limits.bridge.get_connection()
        rl.storage.windows = RedisWindows(client, fake.time, now=fake.time)
    out = []
    try:
        for gap in gaps:
            fake.now += gap / 1000
            decision = await rl.check("app", key)
            assert decision.outcome in ("allow", "deny"), decision
            out.append((fake.now, decision.allowed))
    finally:
        await rl.close()
    return out


# --- on_limit: delay -------------------------------------------------------------------------------


def delaying(**spec: Any) -> RateLimiter:
    """A limiter that holds requests over 2 per second (real time: the wait is what is tested)."""
    return RateLimiter(RateLimitSettings(default=LimitSpec(2, 1, on_limit="delay", **spec)))


async def test_requests_over_the_limit_wait_for_a_slot_instead_of_429() -> None:
    rl = delaying()
    decisions = await asyncio.gather(*(rl.decide("data", "d" * 64, "10.0.0.1") for _ in range(5)))
    assert sorted(d.outcome for d in decisions) == ["allow", "allow", "delayed", "delayed", "delayed"]
    assert all(d.allowed and d.error is None for d in decisions)


async def test_a_full_queue_or_a_long_wait_is_still_429() -> None:
    queued = delaying(max_queued=1)
    decisions = await asyncio.gather(*(queued.decide("data", "d" * 64, "10.0.0.1") for _ in range(4)))
    assert sorted(d.outcome for d in decisions) == ["allow", "allow", "delayed", "queue_full"]
    refused = next(d for d in decisions if d.outcome == "queue_full")
    assert refused.error is not None and refused.error.code is Code.RATE_LIMITED
    impatient = delaying(max_delay_s=0.01)
    decisions = [await impatient.decide("data", "d" * 64, "10.0.0.1") for _ in range(3)]
    assert [d.outcome for d in decisions] == ["allow", "allow", "delay_too_long"]


async def test_a_waiter_that_leaves_frees_its_place() -> None:
    rl = delaying(max_queued=1)
    for _ in range(2):
        assert (await rl.decide("data", "d" * 64, "10.0.0.1")).outcome == "allow"
    waiting = asyncio.ensure_future(rl.decide("data", "d" * 64, "10.0.0.1"))
    while not rl.queues.waiting:  # the request is queued
        await asyncio.sleep(0)
    waiting.cancel()  # the client disconnected
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert rl.queues.waiting == 0
    assert (await rl.decide("data", "d" * 64, "10.0.0.1")).outcome == "delayed"  # the place is free again


def test_memory_holds_only_the_keys_active_in_a_window() -> None:
    now = [1000.0]
    windows = MemoryWindows(lambda: now[0])
    for n in range(5000):
        windows.hit_now(f"tok:{n}", 100, 60)
    assert len(windows) == 5000
    now[0] += 61  # every one of them left its window
    for _ in range(2048):  # sweeps run every 1024 decisions
        windows.hit_now("tok:busy", 1_000_000, 60)
    assert len(windows) == 1


def test_a_huge_limit_keeps_one_timestamp_per_counted_request() -> None:
    """The deque holds what is in the window, never `limit` slots: memory follows traffic, not the limit."""
    now = [1000.0]
    windows = MemoryWindows(lambda: now[0])
    for _ in range(10):
        assert windows.hit_now("k", 1_000_000, 60).allowed
    assert windows.hit_now("k", 1_000_000, 60).remaining == 1_000_000 - 11


async def test_a_newcomer_queues_behind_those_waiting_even_when_a_slot_is_free() -> None:
    """First come, first served: the slot the head of the line waits for is not taken by a request that
    arrives just as it frees (the loop busy, or a Redis round trip, delaying the head's wake-up)."""
    now = [1000.0]
    rl = RateLimiter(RateLimitSettings(default=LimitSpec(1, 1, on_limit="delay")), lambda: now[0])
    assert (await rl.decide("data", "d" * 64, "10.0.0.1")).outcome == "allow"
    first = asyncio.ensure_future(rl.decide("data", "d" * 64, "10.0.0.1"))
    newcomer = None
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            while rl.queues.waiting < 1:  # the first is in line
                await asyncio.sleep(0)
            now[0] += 1.5  # its slot is free; it has not woken up yet
            newcomer = asyncio.ensure_future(rl.decide("data", "d" * 64, "10.0.0.1"))
            while rl.queues.waiting < 2 and not newcomer.done():
                await asyncio.sleep(0)
        assert not newcomer.done() and rl.queues.waiting == 2  # behind the first, not through
    finally:
        for task in (first, newcomer):
            if task is not None:
                task.cancel()
        await asyncio.gather(first, *([newcomer] if newcomer else []), return_exceptions=True)
        await rl.close()
