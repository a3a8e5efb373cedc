"""The per-request counts behind `/metrics`: plain numbers, exported in Prometheus' own format."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.exchange import Exchange
from gateway.metrics import Metrics


def finished(status: int, seconds: float | None = None, out: int = 0) -> Exchange:
    exchange = Exchange(request_id="r", method="GET", raw_target="/v1/x", client_ip="10.0.0.1", route="app")
    exchange.status, exchange.upstream_seconds, exchange.bytes_out = status, seconds, out
    return exchange


def test_upstream_durations_land_in_cumulative_le_buckets() -> None:
    metrics = Metrics()
    for seconds in (0.005, 0.0051, 61.0):  # on a bound counts in it; past the last one, only in +Inf
        metrics.count(finished(200, seconds, out=7))
    metrics.count(finished(429))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }

    def bucket(le: str) -> float:
        return samples[("bt_gateway_upstream_duration_seconds_bucket", (("le", le), ("route", "app")))]

    assert (bucket("0.005"), bucket("0.01"), bucket("60.0"), bucket("+Inf")) == (1, 2, 2, 3)
    assert samples[("bt_gateway_upstream_duration_seconds_count", (("route", "app"),))] == 3
    total = samples[("bt_gateway_upstream_duration_seconds_sum", (("route", "app"),))]
    assert total == pytest.approx(61.0101)
    assert samples[("bt_gateway_requests_total", (("route", "app"), ("status", "200")))] == 3
    assert samples[("bt_gateway_requests_total", (("route", "app"), ("status", "429")))] == 1
    assert samples[("bt_gateway_bytes_total", (("direction", "out"), ("route", "app")))] == 21
