"""Prometheus metrics for `GET /metrics` on the admin listener, through `prometheus-client`.

One registry per gateway process (not the library's global one), living across reloads. Label values are
bounded by construction: configured route names (or `forward_proxy`, `tunnel`, `none`), HTTP statuses, error
codes, tunnel close reasons, `in`/`out`, `success`/`failure`, the config's sha256. Never a token, a path or
a client address. The standard `process_*` metrics come from prometheus-client's ProcessCollector, and no
counter has a `_created` series (disabled for the process: a scrape's worth of noise per counter). What
has no bounded label (denied host names, token fingerprints) is kept apart, in fixed-size top-k counters
for the status page (gateway/status.py), and never exported here.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway import __version__
from gateway.errors import UPSTREAM_FAILURES, Code
from gateway.exchange import NO_ROUTE, TUNNEL_ROUTE, Exchange
from gateway.policy.credentials import FINGERPRINT_HEX
from gateway.topk import TopK

CONTENT_TYPE = CONTENT_TYPE_LATEST
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BUCKET_LABELS = (*map(floatToGoString, DURATION_BUCKETS), "+Inf")
TOP_K = 64  # keys each top-k counter holds: the page shows the first 10, the rest keep the estimates honest
HOST_REFUSALS = frozenset({Code.EGRESS_DENIED, Code.USE_REVERSE_MODE})  # refused for where they were going
MAX_HOST = 253  # the longest DNS name: a hostile absolute-form target holds no more of a counter's memory


def _family(
    name: str,
    documentation: str,
    labels: tuple[str, ...],
    counts: Mapping[str, int] | Mapping[tuple[str, str], int],
) -> CounterMetricFamily:
    """A counter family from plain counts keyed by its label values (one label: the value alone)."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, count in counts.items():
        family.add_metric(key if isinstance(key, tuple) else (key,), count)
    return family


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
        self.would_refuse: dict[tuple[str, str], int] = {}  # report mode: (step, reason), read by /status
        self.upstream_failures: defaultdict[tuple[str, str], int] = defaultdict(int)  # (route, code)
        self.last_upstream: dict[str, int | Code] = {}  # route -> the last upstream status, or failure code

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
        refusals = _family(
            "bt_gateway_refusals", "Requests that ended with a gateway error code.", ("code",), self.refusals
        )
        relayed = _family(
            "bt_gateway_bytes",
            "Body bytes relayed: in from clients, out to clients.",
            ("route", "direction"),
            self.bytes,
        )
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
        bypasses = _family(
            "bt_gateway_bypass",
            "Ways around the gateway seen in traffic: data_plane_not_routed, relay_host_not_allowed, "
            "use_reverse_mode.",
            ("event",),
            self.bypasses,
        )
        would_refuse = _family(
            "bt_gateway_would_refuse",
            "Requests report mode let through that enforce mode would have refused, by step and reason.",
            ("step", "reason"),
            self.would_refuse,
        )
        failures = _family(
            "bt_gateway_upstream_failures",
            "Requests that ended in 502/504 because the upstream failed (unreachable, timed out, a bad "
            "response), apart from the policy's refusals.",
            ("route", "code"),
            self.upstream_failures,
        )
        yield from (requests, refusals, relayed, durations, bypasses, would_refuse, failures)


class Metrics:
    """Every metric the gateway exports, and the one place an `Exchange` is counted."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide, and idempotent
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)  # process_*: memory, open fds, CPU, start time
        self.counts = RequestCounts()
        registry.register(self.counts)
        self.would_refuse = self.counts.would_refuse  # (step, reason) -> count, for the status page
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
        self.delay_queued = Gauge(
            "bt_gateway_rate_limit_queued",
            "Requests waiting for a rate-limit slot now (on_limit: delay).",
            registry=registry,
        )
        self.watch_checks = Counter(
            "bt_gateway_config_watch_checks",
            "Polls of the config file by `serve --watch` (each compares its content with the last).",
            registry=registry,
        )
        self.reload_last_success = Gauge(
            "bt_gateway_reload_last_success",
            "1 when the last config load (at start, then each reload) succeeded, 0 when it was refused.",
            registry=registry,
        )
        self.reload_last_timestamp = Gauge(
            "bt_gateway_reload_last_timestamp_seconds",
            "When the last config load (at start, then each reload) ended, whatever its result.",
            registry=registry,
        )
        self.config_info = Gauge(
            "bt_gateway_config_info",
            "The sha256 of the effective config serving now, secrets masked (as check-config prints it).",
            ("sha256",),
            registry=registry,
        )
        self.denied_hosts = TopK(TOP_K)  # hosts of HOST_REFUSALS
        self.limited_tokens = TopK(TOP_K)  # fingerprints of tokens refused by their rate limit
        build = Gauge("bt_gateway_build_info", "The running version.", ("version",), registry=registry)
        build.labels(version=__version__).set(1)
        for result in ("success", "failure"):
            self.reloads.labels(result=result)  # exported as 0 before the first reload
        self.last_reload: tuple[bool, float] | None = None  # (succeeded, when): the status page reads it

    def config_loaded(self, sha256: str) -> None:
        """A config serves now (at start, or after a reload): its hash, and the load's success."""
        self.config_info.clear()
        self.config_info.labels(sha256=sha256).set(1)
        self._load_ended(ok=True)

    def reload_refused(self) -> None:
        """A reload kept the old config: counted, and the last load's result is a failure."""
        self.reloads.labels(result="failure").inc()
        self._load_ended(ok=False)

    def _load_ended(self, *, ok: bool) -> None:
        now = time.time()
        self.last_reload = (ok, now)
        self.reload_last_success.set(1 if ok else 0)
        self.reload_last_timestamp.set(now)

    def count(self, exchange: Exchange) -> None:
        """Count one finished request: its route and status, its error code, its bytes and upstream time."""
        counts = self.counts
        # The route label: a configured route name, `forward_proxy`, `tunnel`, or `none` (refused before
        # a route was known).
        route = TUNNEL_ROUTE if exchange.method == "CONNECT" else exchange.route or NO_ROUTE
        counts.requests[route, exchange.status] += 1
        if exchange.upstream_status is not None:
            counts.last_upstream[route] = exchange.upstream_status
        error = exchange.error
        if error is not None:
            self._refused(exchange, route, error.code)
        if exchange.upstream_seconds is not None:
            counts.observe(route, exchange.upstream_seconds)
        if exchange.bytes_in:
            counts.bytes[route, "in"] += exchange.bytes_in
        if exchange.bytes_out:
            counts.bytes[route, "out"] += exchange.bytes_out
        for bypass in exchange.bypasses:
            counts.bypasses[bypass.event] += 1
        if exchange.would_refuse is not None:
            step, refusal = exchange.would_refuse
            key = (step, refusal.why)
            counts.would_refuse[key] = counts.would_refuse.get(key, 0) + 1

    def _refused(self, exchange: Exchange, route: str, code: Code) -> None:
        """A refusal: by code, and the denied host or the rate-limited token's fingerprint (O(1) each)."""
        counts = self.counts
        counts.refusals[str(code)] += 1
        if code in HOST_REFUSALS:
            if exchange.upstream_host is not None:
                self.denied_hosts.add(exchange.upstream_host[:MAX_HOST])
        elif code is Code.RATE_LIMITED:
            if exchange.token_digest is not None and route != TUNNEL_ROUTE:  # tunnels: counted per address
                self.limited_tokens.add(exchange.token_digest[:FINGERPRINT_HEX])
        elif code in UPSTREAM_FAILURES:  # no upstream status to show: the route's last answer is the code
            counts.last_upstream[route] = code
            counts.upstream_failures[route, str(code)] += 1

    def storage_error(self) -> None:
        self.storage_errors.inc()

    def storage_up(self, up: bool) -> None:
        self.storage_is_up.set(int(up))

    def decided_without_storage(self) -> None:
        self.without_storage.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
