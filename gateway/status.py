"""What the status page shows (`GET /status.json` on the admin listener), gathered when it is asked for.

The request path pays nothing for the page beyond the O(1) counters `Metrics.count` keeps anyway (and two
top-k counters, on refusals only). The rest is read here, per look: the live generation, connections,
the rate-limit store (pinged, bounded by `storage_timeout_ms`). Rates and latency percentiles over the
last minutes come from snapshots of the counters that a timer takes every `SAMPLE_S` seconds, never from
work per request.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from yarl import URL

from gateway import __version__
from gateway.config.model import GatewayConfig
from gateway.config.redact import config_sha256
from gateway.exchange import FORWARD_PROXY_ROUTE
from gateway.generation import Generation
from gateway.metrics import DURATION_BUCKETS, Metrics
from gateway.policy.ratelimit import RateLimiter
from gateway.policy.storage_uri import parse_storage_uri
from gateway.reload import ReloadResult
from gateway.tunnel import TunnelStats

SAMPLE_S = 5.0  # the request-rate chart's resolution
WINDOW_SAMPLES = 60  # samples kept: rates and percentiles cover the last 5 minutes
TOP_SHOWN = 10  # rows of each top-k table
MIN_PARTIAL_S = 1.0  # the interval since the last tick is charted once this long: no spike from 1 request
OUTAGE = {"allow": "failing open", "deny": "failing closed"}  # on_storage_error -> requests while it is down
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


def quantile(counts: Sequence[float], q: float) -> float | None:
    """The `q` quantile of a duration histogram (`RequestCounts.durations` layout: per-bucket counts for
    DURATION_BUCKETS, then +Inf, then the sum), interpolated linearly inside its bucket as Prometheus'
    `histogram_quantile` does; past the last bound, that bound. None without observations."""
    observed = sum(counts[:-1])
    if observed <= 0:
        return None
    rank, below, lower = q * observed, 0.0, 0.0
    for bound, in_bucket in zip(DURATION_BUCKETS, counts, strict=False):
        if in_bucket and below + in_bucket >= rank:
            return lower + (bound - lower) * (rank - below) / in_bucket
        below, lower = below + in_bucket, bound
    return DURATION_BUCKETS[-1]


@dataclass(frozen=True, slots=True)
class Sample:
    """The counters at one instant: requests answered so far, and each route's duration histogram."""

    at: float  # monotonic seconds
    requests: int
    durations: dict[str, list[float]]


class History:
    """The last `WINDOW_SAMPLES` samples, taken by a timer; the newest is always now's (taken per look)."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self._samples: deque[Sample] = deque(maxlen=WINDOW_SAMPLES)
        self._timer: asyncio.TimerHandle | None = None

    def take(self) -> Sample:
        counts = self._metrics.counts
        durations = {route: list(buckets) for route, buckets in counts.durations.items()}
        return Sample(self._clock(), sum(counts.requests.values()), durations)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._samples.append(self.take())
        self._timer = loop.call_later(SAMPLE_S, self.start, loop)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def window(self) -> tuple[Sample, list[Sample]]:
        """The oldest sample kept and every later one, now's last (a look before the first tick: two)."""
        now = self.take()
        samples = list(self._samples) or [now]
        return samples[0], [*samples[1:], now]


@dataclass(frozen=True, slots=True)
class Loaded:
    """The generation serving now: which file, when, and its digest."""

    origin: str
    at: str  # ISO 8601, UTC
    digest: str


class Observed(Protocol):
    """The side of the gateway the page looks at (server.Gateway)."""

    @property
    def generation(self) -> Generation | None: ...

    @property
    def tunnels(self) -> TunnelStats: ...

    @property
    def open_connections(self) -> int: ...

    def delayed_requests(self) -> int: ...


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class StatusBoard:
    """Keeps what only events can tell (the generation loaded, the last reload) and builds the snapshot."""

    def __init__(self, gateway: Observed, metrics: Metrics) -> None:
        self._gateway = gateway
        self._metrics = metrics
        self.history = History(metrics)
        self._loaded: Loaded | None = None
        self._last_reload: dict[str, Any] | None = None

    def serving(self, config: GatewayConfig, origin: str) -> None:
        """A generation started serving: at start, and after each reload that swapped one in."""
        self._loaded = Loaded(origin, _now(), config_sha256(config))

    def reloaded(self, result: ReloadResult) -> None:
        self._last_reload = {
            "ok": result.ok,
            "at": _now(),
            "config": result.origin,
            "problems": list(result.problems),
        }

    async def snapshot(self) -> dict[str, Any]:
        """Everything `/status.json` answers; plain JSON types only."""
        generation = self._gateway.generation
        metrics = self._metrics
        first, later = self.history.window()
        tunnels = self._gateway.tunnels
        return {
            "version": __version__,
            "at": _now(),
            "generation": self._generation(),
            "requests": _rates(first, later),
            "refusals": dict(sorted(metrics.counts.refusals.items())),
            "would_refuse": {
                f"{step}/{why}": n for (step, why), n in sorted(metrics.counts.would_refuse.items())
            },
            "denied_hosts": [
                {"host": f.key, "count": f.count, "error": f.error}
                for f in metrics.denied_hosts.top(TOP_SHOWN)
            ],
            "rate_limited_tokens": [
                {"fingerprint": f.key, "count": f.count, "error": f.error}
                for f in metrics.limited_tokens.top(TOP_SHOWN)
            ],
            "routes": _routes(generation, metrics, first, later[-1]),
            "connections": {"clients": self._gateway.open_connections, "tunnels": tunnels.active},
            "rate_limit": await _storage(generation.limiter) if generation is not None else None,
            "delayed_requests": self._gateway.delayed_requests(),
        }

    def _generation(self) -> dict[str, Any] | None:
        loaded = self._loaded
        if loaded is None:
            return None
        return {
            "config": loaded.origin,
            "loaded_at": loaded.at,
            "sha256": loaded.digest,
            "last_reload": self._last_reload,
        }


def _rates(first: Sample, later: list[Sample]) -> dict[str, Any]:
    """Requests per second between consecutive samples, as (seconds before now, rate) points."""
    points, previous, now = [], first, later[-1].at
    for sample in later:
        elapsed = sample.at - previous.at
        if elapsed >= (MIN_PARTIAL_S if sample is later[-1] else 0) and elapsed > 0:
            rate = (sample.requests - previous.requests) / elapsed
            points.append([round(sample.at - now, 3), round(rate, 3)])
        previous = sample
    return {
        "window_s": round(now - first.at, 3),
        "sample_s": SAMPLE_S,
        "total": later[-1].requests - first.requests,
        "rps": points,
    }


def _routes(
    generation: Generation | None, metrics: Metrics, first: Sample, now: Sample
) -> list[dict[str, Any]]:
    """Each configured route (then `forward_proxy`, once used): its upstream, its last upstream answer and
    its upstream latency percentiles over the window."""
    upstreams = {r.name: str(URL(r.upstream)) for r in generation.config.routes} if generation else {}
    last = metrics.counts.last_upstream
    names = [*upstreams, *(n for n in (FORWARD_PROXY_ROUTE,) if n in last or n in now.durations)]
    rows = []
    for name in names:
        current = now.durations.get(name)
        before = first.durations.get(name)
        window = [c - (before[i] if before else 0.0) for i, c in enumerate(current)] if current else []
        answered = last.get(name)
        row: dict[str, Any] = {
            "name": name,
            "upstream": upstreams.get(name, "any allow-listed host (absolute-form requests)"),
            "last_status": str(answered) if answered is not None else None,
            "observed": round(sum(window[:-1])) if window else 0,
        }
        for label, q in QUANTILES:
            value = quantile(window, q) if window else None
            row[label + "_ms"] = round(value * 1000, 3) if value is not None else None
        rows.append(row)
    return rows


async def _storage(limiter: RateLimiter) -> dict[str, Any]:
    """Where the counters live, whether that store answers now, and what a dead one means for requests."""
    settings = limiter.settings
    uri = parse_storage_uri(settings.storage)  # (not yarl: a sentinel or cluster URI lists several hosts)
    up = await limiter.storage_up()
    state = "counting" if up else OUTAGE[settings.on_storage_error]
    return {
        "storage": uri.scheme,
        "uri": uri.masked(),
        "up": up,
        "on_storage_error": settings.on_storage_error,
        "state": state,
    }
