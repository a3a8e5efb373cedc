"""Exact moving windows, one store operation per decision: in process memory, or in Redis.

A request is counted when fewer than `limit` counted requests lie in the closed interval
[now - window, now]; the window is reset when its oldest counted request leaves it. This is the moving-window
semantics of the `limits` library users configure (the exactness property test holds for both stores),
with the cost made independent of the limit:

- memory: a deque of at most `limit` timestamps per key; expired ones leave from the front, so a
  decision is O(1) amortized whatever the limit (the `limits` memory store inserts at the front of a
  list, O(n)), and takes no lock because it never awaits;
- Redis: one Lua script per decision over a sorted set (ZREMRANGEBYSCORE, ZCARD, ZADD, ZRANGE), where
  `limits` needs two round trips, `hit` and then `get_window_stats`; its time is Redis's own (`TIME`).
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict, deque
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

SWEEP_EVERY = 1024  # decisions between two sweeps of idle keys out of memory


class WindowHit(NamedTuple):
    """One decision: counted or not, what is left, and when the oldest counted request leaves."""

    allowed: bool
    remaining: int
    reset: float  # unix seconds


# A WindowHit built in C (tuple.__new__), not through the named tuple's Python `__new__`: one per decision.
_hit: Callable[[tuple[bool, int, float]], WindowHit] = partial(tuple.__new__, WindowHit)


class MemoryWindows:
    """Moving windows in this process: exact, O(1) amortized, bounded to the keys active in a window."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._windows: OrderedDict[str, tuple[deque[float], float]] = OrderedDict()  # key -> (times, window)
        self._decisions = 0

    async def hit(self, key: str, limit: int, window: float) -> WindowHit:
        return self.hit_now(key, limit, window)

    def hit_now(self, key: str, limit: int, window: float) -> WindowHit:
        now = self._clock()
        entry = self._windows.get(key)
        if entry is None:
            times: deque[float] = deque()
            self._windows[key] = (times, window)
        else:
            times = entry[0]
            self._windows.move_to_end(key)
        horizon = now - window
        while times and times[0] < horizon:
            times.popleft()
        allowed = len(times) < limit
        if allowed:
            times.append(now)
        self._decisions += 1
        if self._decisions % SWEEP_EVERY == 0:
            self._sweep(now)
        reset = times[0] + window if times else now + window
        return _hit((allowed, limit - len(times), reset))

    async def peek(self, key: str, limit: int, window: float) -> WindowHit:
        """What `hit_now` would decide, counting nothing and changing nothing (`bt-gateway explain`);
        `remaining` is before this request."""
        now = self._clock()
        entry = self._windows.get(key)
        live = [t for t in entry[0] if t >= now - window] if entry is not None else []
        reset = live[0] + window if live else now + window
        return WindowHit(len(live) < limit, limit - len(live), reset)

    def _sweep(self, now: float) -> None:
        """Forget keys whose newest request left its window: the least recently used come first."""
        windows = self._windows
        while windows:
            key, (times, window) = next(iter(windows.items()))
            if times and times[-1] >= now - window:
                return
            del windows[key]

    def __len__(self) -> int:
        return len(self._windows)


# Redis's time, never a replica's (ARGV[1] empty), or the caller's (tests that drive time).
_NOW = """
local now
if ARGV[1] == '' then
  local time = redis.call('TIME')
  now = tonumber(time[1]) + tonumber(time[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local window = tonumber(ARGV[2])
"""
_MOVING_WINDOW = (
    _NOW
    + """
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - window))
local count = redis.call('ZCARD', KEYS[1])
local allowed = 0
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  count = count + 1
  allowed = 1
end
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local reset = window
if oldest[2] then reset = tonumber(oldest[2]) + window - now end
return {allowed, limit - count, tostring(reset)}
"""
)
# The same window, read only (`bt-gateway explain`): how many requests it holds now and how long until
# the oldest leaves; it writes nothing.
_MOVING_WINDOW_PEEK = (
    _NOW
    + """
local since = now - window
local count = redis.call('ZCOUNT', KEYS[1], since, '+inf')
local oldest = redis.call('ZRANGEBYSCORE', KEYS[1], since, '+inf', 'LIMIT', 0, 1, 'WITHSCORES')
local reset = window
if oldest[2] then reset = tonumber(oldest[2]) + window - now end
return {count, tostring(reset)}
"""
)


class RedisWindows:
    """Moving windows shared by every replica through Redis: one script call per decision.

    Time is Redis's (`TIME` in the script, Redis 5 or later), never a replica's: replicas whose clocks
    disagree still share one exact window. The script returns how long until the oldest counted request
    leaves, which this replica adds to its own clock for Retry-After. Every key expires one second after its
    window, so an idle token costs nothing.
    """

    PREFIX = "btgw:mw:"  # not the `limits` keys: a different structure (a sorted set per key)
    PROBE_KEY = PREFIX + "probe"  # the start-up check's dry decision (limit 0) never writes it

    def __init__(
        self,
        client: Any,
        clock: Callable[[], float],
        now: Callable[[], float] | None = None,
        *,
        by_body: bool = False,
    ) -> None:
        """`now`: None for Redis's time (the gateway); a clock only for tests that drive time.

        `by_body`: send the script itself (EVAL), never its digest (EVALSHA), so Redis never answers
        NOSCRIPT: over TLS, coredis 5.7 reconnects after an error reply and that reconnection races the
        TLS handshake (a decision then hangs until its timeout, and the next one with it).
        """
        self._client = client
        script = client.register_script(_MOVING_WINDOW)
        self._script = partial(client.eval, _MOVING_WINDOW) if by_body else script
        peek = client.register_script(_MOVING_WINDOW_PEEK)
        self._peek = partial(client.eval, _MOVING_WINDOW_PEEK) if by_body else peek
        self._clock = clock
        self._now = now
        self._origin = os.urandom(6).hex()  # members are unique across replicas without a syscall each
        self._sequence = itertools.count()

    async def hit(self, key: str, limit: int, window: float) -> WindowHit:
        member = f"{self._origin}:{next(self._sequence)}"
        now = "" if self._now is None else repr(self._now())
        allowed, remaining, reset_in = await self._script(
            keys=[self.PREFIX + key], args=[now, str(window), str(limit), member]
        )
        return WindowHit(bool(allowed), int(remaining), self._clock() + float(reset_in))

    async def probe(self) -> None:
        """A decision that counts nothing: raises what a real one would (auth, TLS, wrong server kind)."""
        await self._script(keys=[self.PROBE_KEY], args=["", "1", "0", "probe"])

    async def peek(self, key: str, limit: int, window: float) -> WindowHit:
        """What `hit` would decide, read only (`bt-gateway explain`); `remaining` is before this request."""
        now = "" if self._now is None else repr(self._now())
        count, reset_in = await self._peek(keys=[self.PREFIX + key], args=[now, str(window)])
        count = int(count)
        return WindowHit(count < limit, limit - count, self._clock() + float(reset_in))
