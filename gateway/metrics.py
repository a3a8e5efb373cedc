"""Prometheus metrics for `GET /metrics` on the admin listener, through `prometheus-client`.

One registry per gateway process (not the library's global one), living across reloads. Label values are
bounded by construction: configured route names (or `forward_proxy`, `tunnel`, `none`), HTTP statuses, error
codes, tunnel close reasons, `in`/`out`, `success`/`failure`. Never a token, a path or a client address.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway import __version__
from gateway.exchange import Exchange

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every metric the gateway exports, and the one place an `Exchange` is counted."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "bt_gateway_requests",
            "Requests the proxy answered, refusals included.",
            ("route", "status"),
            registry=registry,
        )
        self.refusals = Counter(
            "bt_gateway_refusals",
            "Requests that ended with a gateway error code.",
            ("code",),
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "bt_gateway_upstream_duration_seconds",
            "Time from sending a request upstream to its response head.",
            ("route",),
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.bytes = Counter(
            "bt_gateway_bytes",
            "Body bytes relayed: in from clients, out to clients.",
            ("route", "direction"),
            registry=registry,
        )
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
        self.reloads = Counter(
            "bt_gateway_config_reloads", "Config reloads, by result.", ("result",), registry=registry
        )
        self._children: dict[tuple[str, int], tuple[Any, Any, Any, Any]] = {}  # bounded: routes x statuses
        build = Gauge("bt_gateway_build_info", "The running version.", ("version",), registry=registry)
        build.labels(version=__version__).set(1)
        for result in ("success", "failure"):
            self.reloads.labels(result=result)  # exported as 0 before the first reload

    def count(self, exchange: Exchange) -> None:
        """Count one finished request: its route and status, its error code, its bytes and upstream time."""
        route = exchange.metric_route
        children = self._children.get((route, exchange.status))
        if children is None:  # label lookups cost a lock and a tuple: once per (route, status)
            children = self._children[(route, exchange.status)] = (
                self.requests.labels(route=route, status=str(exchange.status)),
                self.upstream_duration.labels(route=route),
                self.bytes.labels(route=route, direction="in"),
                self.bytes.labels(route=route, direction="out"),
            )
        requests, duration, bytes_in, bytes_out = children
        requests.inc()
        if exchange.error is not None:
            self.refusals.labels(code=str(exchange.error.code)).inc()
        if exchange.upstream_seconds is not None:
            duration.observe(exchange.upstream_seconds)
        if exchange.bytes_in:
            bytes_in.inc(exchange.bytes_in)
        if exchange.bytes_out:
            bytes_out.inc(exchange.bytes_out)

    def storage_error(self) -> None:
        self.storage_errors.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
