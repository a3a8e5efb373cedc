"""Forward-proxy authentication: `Proxy-Authorization: Basic` checked against scrypt hashes from config.

Hash grammar (what `bt-gateway hash-password` prints):
    scrypt$<log2 n>$<r>$<p>$<salt, base64>$<key, base64>
scrypt costs tens of milliseconds on purpose, so a verified header is remembered (by its sha256, in a
small bounded cache) and repeat requests on the hot path cost one dictionary lookup; the rest is verified
off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gateway.errors import Code, GatewayError

REALM_HEADER = ("Proxy-Authenticate", 'Basic realm="bt-gateway"')
_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class ScryptHash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @classmethod
    def parse(cls, text: str) -> ScryptHash:
        """Parse the module's hash grammar; raise ValueError saying what is wrong."""
        parts = text.split("$")
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError(
                "must look like scrypt$<log2 n>$<r>$<p>$<salt>$<key> (see bt-gateway hash-password)"
            )
        try:
            log2_n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt, key = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
        except (ValueError, binascii.Error) as exc:
            raise ValueError(f"is not a valid scrypt hash: {exc}") from None
        if not (10 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16 and salt and len(key) >= 16):
            raise ValueError("scrypt parameters out of range (log2 n 10-20, r 1-32, p 1-16)")
        return cls(log2_n, r, p, salt, key)

    def verify(self, password: str) -> bool:
        derived = _derive(password, self.salt, log2_n=self.log2_n, r=self.r, p=self.p, length=len(self.key))
        return hmac.compare_digest(derived, self.key)


def _derive(password: str, salt: bytes, *, log2_n: int, r: int, p: int, length: int) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=length, maxmem=256 * n * r * p + 2**20
    )


def hash_password(password: str, log2_n: int = 14, r: int = 8, p: int = 1) -> str:
    """A new salted scrypt hash in the module's grammar."""
    salt = os.urandom(16)
    key = _derive(password, salt, log2_n=log2_n, r=r, p=p, length=32)
    return f"scrypt${log2_n}${r}${p}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


class FailureWindow:
    """Exact sliding-window count of failed attempts per client address, bounded in keys and entries.

    An attempt counts from the moment it starts (so a burst of concurrent guesses is bounded too) and is
    taken back when it succeeds. Memory: at most `max_keys` addresses of at most `limit` timestamps.
    """

    def __init__(
        self, limit: int, window_s: float, clock: Callable[[], float], max_keys: int = 65536
    ) -> None:
        self._limit = limit
        self._window = window_s
        self._clock = clock
        self._max_keys = max_keys
        self._attempts: OrderedDict[str, deque[float]] = OrderedDict()

    def with_limit(self, limit: int) -> FailureWindow:
        """The same attempts under a new limit: for the next generation, while this one serves its last
        requests. Failed attempts are facts about an address, so neither a reload nor a new limit gives
        it a fresh allowance."""
        carried = FailureWindow(limit, self._window, self._clock, self._max_keys)
        carried._attempts = self._attempts
        return carried

    def start(self, key: str) -> float | None:
        """Count an attempt and return None, or refuse it: the seconds until the oldest one ages out."""
        now = self._clock()
        times = self._attempts.get(key)
        if times is None:
            times = self._attempts[key] = deque()
            if len(self._attempts) > self._max_keys:
                self._attempts.popitem(last=False)
        else:
            self._attempts.move_to_end(key)
        while times and times[0] <= now - self._window:
            times.popleft()
        if len(times) >= self._limit:
            return times[0] + self._window - now
        times.append(now)
        return None

    def blocked(self, key: str) -> float | None:
        """What `start` would answer, counting nothing: None, or the seconds until an attempt is allowed."""
        now = self._clock()
        times = [t for t in self._attempts.get(key, ()) if t > now - self._window]
        return times[0] + self._window - now if len(times) >= self._limit else None

    def succeeded(self, key: str) -> None:
        """Take back the newest attempt of `key`: it was not a failure."""
        times = self._attempts.get(key)
        if times:
            times.pop()


VERIFY_THREADS = 2  # scrypt holds ~16 MiB and tens of ms per check; two at a time bound both


class ProxyAuth:
    """Checks Proxy-Authorization; `users` maps a user name to its parsed hash.

    scrypt runs in a small thread pool, never on the event loop, and only for headers not verified
    before; each client address gets `max_failures_per_minute` attempts that do not succeed.
    """

    def __init__(
        self,
        users: dict[str, ScryptHash],
        max_failures_per_minute: int = 10,
        clock: Callable[[], float] = time.monotonic,
        failures: FailureWindow | None = None,
    ) -> None:
        """`failures`: the previous generation's failed attempts, which keep counting (under the new limit).

        Verified headers are not carried: a reload that removes a user or changes a password applies.
        """
        self._users = users
        self._decoy = _decoy_like(users.values())
        self._verified: OrderedDict[bytes, str] = OrderedDict()
        if failures is not None:
            self.failures = failures.with_limit(max_failures_per_minute)
        else:
            self.failures = FailureWindow(max_failures_per_minute, 60.0, clock)
        self._pool: ThreadPoolExecutor | None = None

    async def check(self, header: str | None, client: str, *, count: bool = True) -> str | GatewayError:
        """The authenticated user name, the 407 challenge, or 429 once `client` failed too often.

        `count=False` (`bt-gateway explain`): the same answer, but a failure is not counted.
        """
        if not header:
            return _challenge()
        digest = hashlib.sha256(header.encode("utf-8", "surrogateescape")).digest()
        user = self._verified.get(digest)
        if user is not None:
            self._verified.move_to_end(digest)
            return user
        wait = self.failures.start(client) if count else self.failures.blocked(client)
        if wait is not None:
            retry = str(max(1, math.ceil(wait)))
            return GatewayError(
                Code.TOO_MANY_AUTH_FAILURES,
                "too many failed proxy authentication attempts from this address",
                (("Retry-After", retry),),
            )
        if self._pool is None:
            self._pool = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="bt-gateway-auth")
        user = await asyncio.get_running_loop().run_in_executor(self._pool, self.verify_header, header)
        if user is None:
            return _challenge()
        if count:
            self.failures.succeeded(client)
        self._verified[digest] = user
        if len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return user

    def verify_header(self, header: str) -> str | None:
        """The user a `Basic` header proves, or None; costs one scrypt whatever the header names."""
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        stored = self._users.get(user)
        # Unknown names cost the same scrypt, so response time does not tell which user names exist.
        matched = (stored or self._decoy).verify(password)
        return user if sep and stored is not None and matched else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _challenge() -> GatewayError:
    return GatewayError(Code.PROXY_AUTH_REQUIRED, "proxy authentication required", (REALM_HEADER,))


def _decoy_like(hashes: Iterable[ScryptHash]) -> ScryptHash:
    """A hash no password matches, as costly as the costliest configured one (random salt and key)."""
    costliest = max(hashes, key=lambda h: ((1 << h.log2_n) * h.r * h.p, len(h.key)), default=None)
    if costliest is None:
        return ScryptHash(14, 8, 1, os.urandom(16), os.urandom(32))
    return ScryptHash(
        costliest.log2_n, costliest.r, costliest.p, os.urandom(16), os.urandom(len(costliest.key))
    )
