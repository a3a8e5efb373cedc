"""Admission to the upstream connection pool: a bounded wait, and no client address holding too much of it.

aiohttp's connector would queue a request for a pooled connection without end; here the wait is bounded
by `upstream.pool_timeout_s` and one address may hold at most `limits.max_upstream_share` of the pool, so
a client with many slow uploads cannot starve everyone else. Both refusals are `503 upstream_busy`.
"""

from __future__ import annotations

import asyncio
from collections import deque

from gateway.errors import Code, GatewayError, GatewayFailure

BUSY = GatewayError(Code.UPSTREAM_BUSY, "every upstream connection is in use; try again shortly")
OVER_SHARE = GatewayError(Code.UPSTREAM_BUSY, "this client holds its share of upstream connections")


class UpstreamPool:
    """`size` slots (the connector's limit), waited for at most `wait_s`, at most `share` per address.

    A free slot is taken without a coroutine; only a full pool queues, first come, first served. A slot
    released while others wait passes straight to the first of them, so none is ever free while one waits.
    """

    def __init__(self, size: int, wait_s: float, share: float) -> None:
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._wait_s = wait_s
        self._per_client = max(1, int(size * share))
        self._held: dict[str, int] = {}

    @property
    def waiting(self) -> int:
        """Requests queued for a slot now."""
        return len(self._waiters)

    def try_acquire(self, client: str) -> bool:
        """Take a free slot at once: False when the pool is full and `acquire` must wait.

        GatewayFailure when this address already holds its share.
        """
        held = self._held.get(client, 0)
        if held >= self._per_client:
            raise GatewayFailure(OVER_SHARE)
        if not self._free:
            return False
        self._free -= 1
        self._held[client] = held + 1
        return True

    async def acquire(self, client: str) -> None:
        """Take one upstream connection slot for a request; GatewayFailure when busy. Pair with `release`."""
        if self.try_acquire(client):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._wait_s):
                await waiter
        except BaseException as exc:  # timed out, or the client left while waiting
            if waiter.done() and not waiter.cancelled():
                self._hand_on()  # a slot was handed over just as the wait ended: pass it on
            else:
                self._waiters.remove(waiter)  # a full pool refusing many must not grow the queue
            if isinstance(exc, TimeoutError):
                raise GatewayFailure(BUSY) from None
            raise
        self._held[client] = self._held.get(client, 0) + 1

    def release(self, client: str) -> None:
        remaining = self._held[client] - 1
        if remaining:
            self._held[client] = remaining
        else:
            del self._held[client]
        self._hand_on()

    def _hand_on(self) -> None:
        """A slot came free: to the first request still waiting, else back to the free count."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1
