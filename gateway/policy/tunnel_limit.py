"""New-tunnel rate per client address, in process memory (a tunnel's tokens are inside TLS, unseen).

Memory storage is right here: the limit protects this process's sockets, not a shared quota.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from gateway.errors import Code, GatewayError


class TunnelLimiter:
    """At most `max_tunnels` new tunnels per client address in any `window_s` interval; 0 disables."""

    def __init__(self, max_tunnels: int, window_s: int) -> None:
        self._item = RateLimitItemPerSecond(max_tunnels, window_s) if max_tunnels > 0 else None
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def admit(self, client: str) -> GatewayError | None:
        if self._item is None or self._limiter.hit(self._item, "tunnel", client):
            return None
        reset = self._limiter.get_window_stats(self._item, "tunnel", client).reset_time
        retry = max(1, math.ceil(reset - time.time()))
        return GatewayError(
            Code.RATE_LIMITED, "too many new tunnels from this address", (("Retry-After", str(retry)),)
        )
