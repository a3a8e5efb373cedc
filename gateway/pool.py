"""Admission to the upstream connection pool: a bounded wait, and no client address holding too much of it.

aiohttp's connector would queue a request for a pooled connection without end; here the wait is bounded
by `upstream.pool_timeout_s` and one address may hold at most `limits.max_upstream_share` of the pool, so
a client with many slow uploads cannot starve everyone else. Both refusals are `503 upstream_busy`.
"""

from __future__ import annotations

import asyncio

from gateway.errors import Code, GatewayError, GatewayFailure

BUSY = GatewayError(Code.UPSTREAM_BUSY, "every upstream connection is in use; try again shortly")
OVER_SHARE = GatewayError(Code.UPSTREAM_BUSY, "this client holds its share of upstream connections")


class UpstreamPool:
    """`size` slots (the connector's limit), waited for at most `wait_s`, at most `share` per address."""

    def __init__(self, size: int, wait_s: float, share: float) -> None:
        self._slots = asyncio.Semaphore(size)
        self._wait_s = wait_s
        self._per_client = max(1, int(size * share))
        self._held: dict[str, int] = {}

    async def acquire(self, client: str) -> None:
        """Take one upstream connection slot for a request; GatewayFailure when busy. Pair with `release`."""
        held = self._held.get(client, 0)
        if held >= self._per_client:
            raise GatewayFailure(OVER_SHARE)
        if self._slots.locked():  # only a full pool is waited for (and the wait is bounded)
            try:
                async with asyncio.timeout(self._wait_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise GatewayFailure(BUSY) from None
        else:
            await self._slots.acquire()  # free: returns at once
        self._held[client] = held + 1

    def release(self, client: str) -> None:
        self._slots.release()
        remaining = self._held[client] - 1
        if remaining:
            self._held[client] = remaining
        else:
            del self._held[client]
