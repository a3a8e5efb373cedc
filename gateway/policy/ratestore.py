"""Where the rate limit's counters live, whether that place works, and what an outage looks like.

`RateStore` opens the `limits` storage for a `rate_limit.storage` URI (its Redis client: plain, TLS,
Sentinel, Cluster) plus our moving windows over the same place, and is handed whole to the next generation
on reload. `check` is the start-up test: an unreachable store only degrades the gateway (it decides as
`on_storage_error` says until the store answers), but a store that answers wrongly (refused password, TLS
that does not verify, a cluster named as a single server, not Redis at all) is a config error, refused
before the gateway serves. `StorageHealth` makes an outage visible for as long as it lasts.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from limits.storage import storage_from_string

from gateway.logs import get_logger
from gateway.policy.storage_uri import parse_storage_uri
from gateway.policy.windows import MemoryWindows, RedisWindows

log = get_logger("gateway.ratelimit")

_NETWORK_ERROR = re.compile(r"Errno|[Cc]onnect|[Tt]imeout|timed out")  # coredis on a node it cannot reach
ANSWERED = "the store answered but cannot serve"
CHECK_TIMEOUT_S = 3.0  # the start-up check's bound: a first connection (TLS, HELLO) takes longer than a call
WARN_EVERY_S = 60.0  # an outage's warning is repeated this often while it lasts


@dataclass(frozen=True, slots=True)
class StorageOptions:
    """What the URI does not carry: the password (from a Secret) and the CA bundle for `rediss://`."""

    password: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None


class StorageObserver(Protocol):
    """Where the store's health is exported (the metrics)."""

    def storage_error(self) -> None: ...  # one failed or timed-out store call

    def storage_up(self, up: bool) -> None: ...  # the store answers again, or stopped answering

    def decided_without_storage(self) -> None: ...  # a request decided by `on_storage_error`


class NoObserver:
    """For limiters nobody watches (the tunnel limiter lives in process memory)."""

    def storage_error(self) -> None:
        pass

    def storage_up(self, up: bool) -> None:
        pass

    def decided_without_storage(self) -> None:
        pass


NO_OBSERVER = NoObserver()


class StorageUnusable(Exception):
    """The store answered, but not as a Redis we can use: a config error, not an outage."""


class StorageHealth:
    """Up or down, as the last store call found it. An outage is logged when it starts, again every
    `warn_every_s` while it lasts (with the decisions made without the store), and when it ends."""

    def __init__(
        self, observer: StorageObserver, clock: Callable[[], float], warn_every_s: float = WARN_EVERY_S
    ) -> None:
        self.observer = observer
        self.up = True
        self._clock = clock
        self._warn_every_s = warn_every_s
        self._since = 0.0
        self._warned = 0.0
        self._without = 0  # decisions made without the store in this outage

    def failed(
        self, exc: BaseException, on_storage_error: str, decided: bool, *, counted: bool = True
    ) -> None:
        """A store call failed; `decided`: a request was decided by `on_storage_error` because of it;
        `counted`: a call of the gateway's own (a look from the status page is not)."""
        if counted:
            self.observer.storage_error()
        if decided:
            self._without += 1
            self.observer.decided_without_storage()
        now = self._clock()
        if self.up:
            self.up, self._since, self._without = False, now, int(decided)
            self.observer.storage_up(False)
        elif now - self._warned < self._warn_every_s:
            return
        self._warned = now
        log.warning(
            "rate_limit_storage_unavailable",
            error=type(exc).__name__,
            on_storage_error=on_storage_error,
            down_s=round(now - self._since),
            decisions_without_storage=self._without,
        )

    def down_at_start(self) -> None:
        """The start-up check found the store unreachable; the generation's notice says so, once."""
        if self.up:
            self.up, self._since = False, self._clock()
            self._warned = self._since
            self.observer.storage_up(False)

    def ok(self) -> None:
        if not self.up:
            self.up = True
            self.observer.storage_up(True)
            log.info(
                "rate_limit_storage_recovered",
                down_s=round(self._clock() - self._since),
                decisions_without_storage=self._without,
            )


def _tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """Verify the server against `ca_bundle` (else the system CAs), host name included."""
    return ssl.create_default_context(cafile=ca_bundle)


def _open_storage(uri: str, options: StorageOptions) -> Any:
    """The `limits` storage for a config URI, on the canonical form of the URI.

    Redis clients get no retry policy: a failed call fails at once, bounded by `storage_timeout_ms`, and the
    outage is reported by `StorageHealth`. It is set on the client, not passed as an option: `limits`
    hands a Sentinel's options to each connection, and a connection takes no retry policy (the TypeError
    every Sentinel decision raised). Sentinel reads go to the master too: a replica lags, and a count read
    there would let a token past its limit.
    """
    parsed = parse_storage_uri(uri)
    if parsed.scheme == "memory":
        return storage_from_string("async+memory://")
    from coredis.retry import NoRetryPolicy

    extra: dict[str, Any] = {}
    if options.password is not None:
        extra["password"] = options.password
    if parsed.scheme == "rediss":
        extra["ssl_context"] = _tls_context(options.ca_bundle)
    if parsed.scheme == "redis+sentinel":
        extra["use_replicas"] = False
    storage: Any = storage_from_string("async+" + parsed.text(password=parsed.password), **extra)
    no_retries: Any = NoRetryPolicy()
    storage.bridge.storage.retry_policy = no_retries
    return storage


class RateStore:
    """A `limits` storage (its URI grammar and its Redis client) and, for the moving window, our own
    windows over the same place; with the store's health. Handed whole to the next generation on reload."""

    def __init__(
        self,
        uri: str,
        clock: Callable[[], float] = time.time,
        options: StorageOptions | None = None,
        observer: StorageObserver = NO_OBSERVER,
    ) -> None:
        self.uri = uri
        self.options = options or StorageOptions()
        self.limits: Any = _open_storage(uri, self.options)
        self.memory = uri.startswith("memory://")
        self.single = uri.startswith(("redis://", "rediss://"))  # one server, not Sentinel or Cluster
        self.health = StorageHealth(observer, clock)
        self.windows: MemoryWindows | RedisWindows = MemoryWindows(clock)
        if not self.memory:
            tls = uri.startswith("rediss://")
            self.windows = RedisWindows(self.limits.bridge.get_connection(), clock, by_body=tls)

    async def check(self, timeout_s: float) -> BaseException | None:
        """One dry decision against the store: None if it works, the error if it is unreachable now.

        Raises StorageUnusable when it answered but cannot serve (auth, TLS, protocol, wrong kind).
        """
        if self.memory:
            return None
        try:
            async with asyncio.timeout(timeout_s):
                if self.single and await self._is_cluster_node():  # else MOVED for most keys, at run time
                    raise StorageUnusable(
                        f"{ANSWERED} (a Redis Cluster node: name the nodes in redis+cluster://)"
                    )
                await self.windows.probe()  # type: ignore[union-attr]
        except StorageUnusable:
            raise
        except Exception as exc:
            if unreachable(exc):
                return exc
            raise StorageUnusable(describe(exc)) from None
        return None

    async def _is_cluster_node(self) -> bool:
        from coredis.exceptions import AuthenticationError, ResponseError

        try:
            info = await self.limits.bridge.get_connection().info("cluster")
        except AuthenticationError:
            raise
        except ResponseError:  # INFO renamed or refused (some managed Redis): the dry decision still runs
            return False
        return str(info.get("cluster_enabled")) == "1"

    def disconnect(self) -> None:
        """Close a Redis store's connection pool. Never `reset()`: that deletes every replica's counters."""
        client = getattr(getattr(self.limits, "bridge", None), "storage", None)
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            pool.disconnect()


def unreachable(exc: BaseException) -> bool:
    """A network failure (refused, reset, timed out, no master elected yet), not a wrong answer."""
    from coredis.exceptions import ConnectionError as RedisConnectionError
    from coredis.exceptions import PrimaryNotFoundError, ProtocolError, RedisClusterException
    from coredis.exceptions import TimeoutError as RedisTimeoutError

    if isinstance(exc, RedisClusterException):  # one line per start-up node: unreachable if all are
        nodes = str(exc).partition("Underlying errors:")[2].strip().splitlines()
        return bool(nodes) and all(_NETWORK_ERROR.search(node) for node in nodes)
    if isinstance(exc, ssl.SSLError | ProtocolError):
        return False
    if isinstance(exc, RedisConnectionError) and isinstance(exc.__cause__, ssl.SSLError):
        return False
    network = (OSError, TimeoutError, RedisConnectionError, RedisTimeoutError, PrimaryNotFoundError)
    return isinstance(exc, network)


def describe(exc: BaseException) -> str:
    """One line for a store that cannot serve; Redis error texts carry no secret (AUTH's reply does not)."""
    detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{ANSWERED} ({type(exc).__name__}{': ' + detail if detail else ''})"
