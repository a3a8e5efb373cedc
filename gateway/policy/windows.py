"""Exact moving windows, one store operation per decision: in process memory, or in Redis.

A request is counted when fewer than `limit` counted requests lie in the closed interval
[now - window, now]; the window is reset when its oldest counted request leaves it. This is the moving-window
semantics of the `limits` library users configure (the exactness property test holds for both stores),
with the cost made independent of the limit:

- memory: a deque of at most `limit` timestamps per key; expired ones leave from the front, so a
  decision is O(1) amortized whatever the limit (the `limits` memory store inserts at the front of a
  list, O(n)), and takes no lock because it never awaits;
- Redis: one Lua script per decision over a sorted set (ZREMRANGEBYSCORE, ZCARD, ZADD, ZRANGE), where
  `limits` needs two round trips, `hit` and then `get_window_stats`.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, NamedTuple

SWEEP_EVERY = 1024  # decisions between two sweeps of idle keys out of memory


class WindowHit(NamedTuple):
    """One decision: counted or not, what is left, and when the oldest counted request leaves."""

    allowed: bool
    remaining: int
    reset: float  # unix seconds


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
        return WindowHit(allowed, limit - len(times), reset)

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


_MOVING_WINDOW = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
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
local reset = now + window
if oldest[2] then reset = tonumber(oldest[2]) + window end
return {allowed, limit - count, tostring(reset)}
"""
# The same window, read only: how many requests it holds now and when the oldest leaves (no write).
_MOVING_WINDOW_PEEK = """
local since = tonumber(ARGV[1]) - tonumber(ARGV[2])
local count = redis.call('ZCOUNT', KEYS[1], since, '+inf')
local oldest = redis.call('ZRANGEBYSCORE', KEYS[1], since, '+inf', 'LIMIT', 0, 1, 'WITHSCORES')
return {count, oldest[2] or ''}
"""


class RedisWindows:
    """Moving windows shared by every replica through Redis: one script call per decision."""

    PREFIX = "btgw:mw:"  # not the `limits` keys: a different structure (a sorted set per key)

    def __init__(self, client: Any, clock: Callable[[], float]) -> None:
        self._client = client
        self._script = client.register_script(_MOVING_WINDOW)
        self._peek = client.register_script(_MOVING_WINDOW_PEEK)
        self._clock = clock
        self._origin = os.urandom(6).hex()  # members are unique across replicas without a syscall each
        self._sequence = itertools.count()

    async def hit(self, key: str, limit: int, window: float) -> WindowHit:
        member = f"{self._origin}:{next(self._sequence)}"
        args = [repr(self._clock()), str(window), str(limit), member]
        allowed, remaining, reset = await self._script(keys=[self.PREFIX + key], args=args)
        return WindowHit(bool(allowed), int(remaining), float(reset))

    async def peek(self, key: str, limit: int, window: float) -> WindowHit:
        """What `hit` would decide, read only (`bt-gateway explain`); `remaining` is before this request."""
        now = self._clock()
        count, oldest = await self._peek(keys=[self.PREFIX + key], args=[repr(now), str(window)])
        count = int(count)
        reset = float(oldest) + window if oldest not in ("", b"") else now + window
        return WindowHit(count < limit, limit - count, reset)
