"""Prometheus metrics for `GET /metrics` on the admin listener, through `prometheus-client`.

One registry per gateway process (not the library's global one), living across reloads. Label values are
bounded by construction: configured route names (or `forward_proxy`, `tunnel`, `none`), HTTP statuses, error
codes, tunnel close reasons, `in`/`out`, `success`/`failure`. Never a token, a path or a client address.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway import __version__
from gateway.exchange import Exchange

CONTENT_TYPE = CONTENT_TYPE_LATEST
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BUCKET_LABELS = (*map(floatToGoString, DURATION_BUCKETS), "+Inf")


class RequestCounts(Collector):
    """The per-request metrics as plain numbers, handed to prometheus-client only when scraped.

    One event loop per process counts them, so the request path takes no lock and builds no label tuple:
    a request costs a few dict updates, not five locked `inc()`/`observe()` calls.
    """

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)  # (route, status)
        self.refusals: defaultdict[str, int] = defaultdict(int)  # error code
        self.bytes: defaultdict[tuple[str, str], int] = defaultdict(int)  # (route, in|out)
        self.durations: dict[str, list[float]] = {}  # route -> [count per bucket..., +Inf, sum]
        self.bypasses: defaultdict[str, int] = defaultdict(int)  # bypass event

    def observe(self, route: str, seconds: float) -> None:
        counts = self.durations.get(route)
        if counts is None:
            counts = self.durations[route] = [0.0] * (len(DURATION_BUCKETS) + 2)
        counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "bt_gateway_requests",
            "Requests the proxy answered, refusals included.",
            labels=("route", "status"),
        )
        for (route, status), count in self.requests.items():
            requests.add_metric((route, str(status)), count)
        refusals = CounterMetricFamily(
            "bt_gateway_refusals", "Requests that ended with a gateway error code.", labels=("code",)
        )
        for code, count in self.refusals.items():
            refusals.add_metric((code,), count)
        relayed = CounterMetricFamily(
            "bt_gateway_bytes",
            "Body bytes relayed: in from clients, out to clients.",
            labels=("route", "direction"),
        )
        for labels, count in self.bytes.items():
            relayed.add_metric(labels, count)
        durations = HistogramMetricFamily(
            "bt_gateway_upstream_duration_seconds",
            "Time from sending a request upstream to its response head.",
            labels=("route",),
        )
        for route, counts in self.durations.items():
            cumulative, buckets = 0.0, []
            for bound, in_bucket in zip(_BUCKET_LABELS, counts[:-1], strict=True):
                cumulative += in_bucket
                buckets.append((bound, cumulative))
            durations.add_metric((route,), buckets, counts[-1])
        bypasses = CounterMetricFamily(
            "bt_gateway_bypass",
            "Ways around the gateway seen in traffic: data_plane_not_routed, relay_host_not_allowed, "
            "use_reverse_mode.",
            labels=("event",),
        )
        for event, count in self.bypasses.items():
            bypasses.add_metric((event,), count)
        yield from (requests, refusals, relayed, durations, bypasses)


class Metrics:
    """Every metric the gateway exports, and the one place an `Exchange` is counted."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.counts = RequestCounts()
        registry.register(self.counts)
        self.tunnels_active = Gauge(
            "bt_gateway_tunnels_active", "CONNECT tunnels open now.", registry=registry
        )
        self.tunnels = Counter(
            "bt_gateway_tunnels", "CONNECT tunnels closed, by close reason.", ("reason",), registry=registry
        )
        self.storage_errors = Counter(
            "bt_gateway_rate_limit_storage_errors",
            "Rate-limit store calls that failed or timed out.",
            registry=registry,
        )
        self.storage_is_up = Gauge(
            "bt_gateway_rate_limit_storage_up",
            "1 while the rate-limit store answers (always, for memory://); 0 during an outage.",
            registry=registry,
        )
        self.storage_is_up.set(1)
        self.without_storage = Counter(
            "bt_gateway_rate_limit_decisions_without_storage",
            "Requests decided by on_storage_error (allowed or refused) because the store did not answer.",
            registry=registry,
        )
        self.reloads = Counter(
            "bt_gateway_config_reloads", "Config reloads, by result.", ("result",), registry=registry
        )
        self.watch_checks = Counter(
            "bt_gateway_config_watch_checks",
            "Polls of the config file by `serve --watch` (each compares its content with the last).",
            registry=registry,
        )
        build = Gauge("bt_gateway_build_info", "The running version.", ("version",), registry=registry)
        build.labels(version=__version__).set(1)
        for result in ("success", "failure"):
            self.reloads.labels(result=result)  # exported as 0 before the first reload

    def count(self, exchange: Exchange) -> None:
        """Count one finished request: its route and status, its error code, its bytes and upstream time."""
        counts = self.counts
        route = exchange.metric_route
        counts.requests[route, exchange.status] += 1
        if exchange.error is not None:
            counts.refusals[str(exchange.error.code)] += 1
        if exchange.upstream_seconds is not None:
            counts.observe(route, exchange.upstream_seconds)
        if exchange.bytes_in:
            counts.bytes[route, "in"] += exchange.bytes_in
        if exchange.bytes_out:
            counts.bytes[route, "out"] += exchange.bytes_out
        for bypass in exchange.bypasses:
            counts.bypasses[bypass.event] += 1

    def storage_error(self) -> None:
        self.storage_errors.inc()

    def storage_up(self, up: bool) -> None:
        self.storage_is_up.set(int(up))

    def decided_without_storage(self) -> None:
        self.without_storage.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
