"""What the status page computes from counters: percentiles from histogram buckets, rates from samples,
the config's digest, the page's policy, and the refusals `Metrics.count` feeds to its top-k counters."""

from __future__ import annotations

import pytest

from gateway.config.model import GatewayConfig
from gateway.config.redact import config_sha256
from gateway.errors import Code, GatewayError
from gateway.exchange import Exchange
from gateway.metrics import DURATION_BUCKETS, Metrics
from gateway.policy.credentials import token_digest
from gateway.status import Sample, _rates, quantile
from gateway.status_page import content_security_policy, source_hash
from gateway.topk import Frequent


def histogram(**per_bound: int) -> list[float]:
    """`RequestCounts.durations` layout: a count per bound (`b0_005` is the 0.005 s bucket), +Inf, sum."""
    counts = [0.0] * (len(DURATION_BUCKETS) + 2)
    for name, count in per_bound.items():
        index = (
            len(DURATION_BUCKETS)
            if name == "inf"
            else DURATION_BUCKETS.index(float(name[1:].replace("_", ".")))
        )
        counts[index] = count
    return counts


def test_a_quantile_interpolates_inside_its_bucket_as_prometheus_does() -> None:
    ten_fast = histogram(b0_005=10)
    assert quantile(ten_fast, 0.5) == pytest.approx(0.0025)
    assert quantile(ten_fast, 0.99) == pytest.approx(0.00495)
    spread = histogram(b0_005=50, b0_1=40, b1=10)  # 50 below 5 ms, 40 in (50, 100] ms, 10 in (0.5, 1] s
    assert quantile(spread, 0.5) == pytest.approx(0.005)
    assert quantile(spread, 0.9) == pytest.approx(0.1)
    assert quantile(spread, 0.99) == pytest.approx(0.5 + 0.5 * 9 / 10)


def test_past_the_last_bound_a_quantile_is_that_bound_and_without_data_none() -> None:
    assert quantile(histogram(b0_005=1, inf=1), 0.99) == DURATION_BUCKETS[-1]
    assert quantile(histogram(), 0.5) is None


def test_rates_are_per_interval_and_the_total_is_exact() -> None:
    first = Sample(100.0, 40, {})
    later = [Sample(105.0, 50, {}), Sample(110.0, 50, {}), Sample(112.0, 53, {})]
    assert _rates(first, later) == {
        "window_s": 12.0,
        "sample_s": 5.0,
        "total": 13,
        "rps": [[-7.0, 2.0], [-2.0, 0.0], [0.0, 1.5]],
    }


def test_a_partial_interval_under_a_second_is_not_charted_but_counted() -> None:
    rates = _rates(Sample(100.0, 0, {}), [Sample(105.0, 10, {}), Sample(105.2, 11, {})])
    assert (rates["total"], rates["rps"]) == (11, [[-0.2, 2.0]])


def test_the_config_sha256_follows_the_effective_config_not_its_spelling() -> None:
    one = GatewayConfig.model_validate({"shutdown_timeout_s": 3, "rate_limit": {"max_requests": 5}})
    same = GatewayConfig.model_validate({"rate_limit": {"max_requests": 5}, "shutdown_timeout_s": 3.0})
    other = GatewayConfig.model_validate({"shutdown_timeout_s": 3, "rate_limit": {"max_requests": 6}})
    assert config_sha256(one) == config_sha256(same) != config_sha256(other)
    assert len(config_sha256(one)) == 64


def test_the_policy_allows_the_one_inline_script_and_style_by_hash() -> None:
    html = "<html><head><style>b{}</style></head><body><script>go()</script></body></html>"
    assert (
        source_hash("go()") == "'sha256-5KYv+PUboo5h+0+YAtGRPbwv5d/QxzHslP4YGnUaxRw='"
    )  # printf "go()" | openssl dgst -sha256 -binary | base64
    policy = content_security_policy(html)
    assert f"script-src {source_hash('go()')};" in policy
    assert f"style-src {source_hash('b{}')};" in policy
    with pytest.raises(ValueError, match="exactly one <script>"):
        content_security_policy(html.replace("</body>", "<script>x()</script></body>"))


def refused(
    code: Code, *, host: str | None = None, token: str | None = None, method: str = "GET"
) -> Exchange:
    exchange = Exchange(request_id="r", method=method, raw_target="/", client_ip="10.0.0.1", route="app")
    exchange.upstream_host = host
    exchange.token_digest = token_digest(token) if token is not None else None
    exchange.refuse(GatewayError(code, "x"))
    return exchange


def test_refusals_feed_the_denied_hosts_and_the_limited_fingerprints_only() -> None:
    metrics = Metrics()
    metrics.count(refused(Code.EGRESS_DENIED, host="evil.example", token="sk-1"))
    metrics.count(refused(Code.USE_REVERSE_MODE, host="api.example", method="CONNECT"))
    metrics.count(refused(Code.EGRESS_DENIED, host="x" * 300))
    metrics.count(refused(Code.RATE_LIMITED, host="api.example", token="sk-1"))
    metrics.count(refused(Code.RATE_LIMITED, token="sk-2", method="CONNECT"))  # tunnels: per address
    metrics.count(refused(Code.RATE_LIMITED))  # no token: counted by address, not here
    metrics.count(refused(Code.PATH_DENIED, host="api.example", token="sk-3"))
    assert metrics.denied_hosts.top(5) == [
        Frequent("evil.example", 1, 0),
        Frequent("api.example", 1, 0),
        Frequent("x" * 253, 1, 0),
    ]
    assert metrics.limited_tokens.top(5) == [Frequent(token_digest("sk-1")[:12], 1, 0)]


def test_a_route_shows_its_last_upstream_answer_or_failure() -> None:
    metrics = Metrics()
    answered = refused(Code.UPSTREAM_BAD_ENCODING)  # the head came (200), then the body failed
    answered.upstream_status = 200
    metrics.count(answered)
    assert metrics.counts.last_upstream == {"app": Code.UPSTREAM_BAD_ENCODING}
    ok = Exchange(request_id="r", method="GET", raw_target="/", client_ip="10.0.0.1", route="app")
    ok.status = ok.upstream_status = 201
    metrics.count(ok)
    metrics.count(refused(Code.RATE_LIMITED, token="sk-1"))  # a refusal is no upstream answer
    assert metrics.counts.last_upstream == {"app": 201}
