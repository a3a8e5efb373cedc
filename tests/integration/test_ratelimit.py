"""Rate limiting through the real gateway: in process memory, and shared by two processes through Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.clients import scrape, value
from tests.conftest import GatewayFactory, Upstream, route_to
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer
from tests.unit.test_ratelimit import assert_exact, run_arrivals


async def hit(client: aiohttp.ClientSession, url: str, token: str | None = "tok-a") -> aiohttp.ClientResponse:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with client.get(url, headers=headers) as resp:
        await resp.read()
        return resp


async def test_n_plus_k_gives_exactly_n_forwarded(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(upstream), rate_limit={"max_requests": 5, "window_minutes": 1})
    async with aiohttp.ClientSession() as client:
        answers = [await hit(client, gw.url + "/v1/x") for _ in range(8)]
        other = await hit(client, gw.url + "/v1/x", token="tok-b")
        async with client.get(gw.url + "/v1/x", headers={"Authorization": "Bearer tok-a"}) as resp:
            body = await resp.json()
    assert [a.status for a in answers] == [200] * 5 + [429] * 3
    assert other.status == 200
    assert len(upstream.recorder.requests) == 6  # 5 for tok-a, 1 for tok-b, no refused one forwarded
    assert answers[0].headers["RateLimit-Policy"] == '"default";q=5;w=60'
    assert answers[0].headers["RateLimit"].startswith('"default";r=4;t=')
    refused = answers[5]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["RateLimit"].startswith('"default";r=0;t=')
    assert body["error"]["code"] == "rate_limited"
    assert body["error"]["request_id"] == resp.headers["X-Request-Id"]


async def test_per_route_override_and_off(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    host = upstream.url.split("://")[1]
    gw = await start_gateway(
        allowlist=[host],
        routes=[
            {"name": "app", "prefix": "/", "upstream": upstream.url, "rate_limit": {"max_requests": 2}},
            {"name": "data", "prefix": "/data-plane", "upstream": upstream.url, "rate_limit": "off"},
        ],
        rate_limit={"max_requests": 1},
    )
    async with aiohttp.ClientSession() as client:
        app = [(await hit(client, gw.url + "/x")).status for _ in range(3)]
        data = [await hit(client, gw.url + "/data-plane/logs3") for _ in range(20)]
    assert app == [200, 200, 429]
    assert all(d.status == 200 and "RateLimit" not in d.headers for d in data)


async def test_upstream_ratelimit_fields_are_kept_ours_appended(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**route_to(upstream), rate_limit={"max_requests": 5})
    async with aiohttp.ClientSession() as client:
        resp = await hit(client, gw.url + "/ratelimited")
    assert resp.headers.getall("RateLimit") == ['"upstream";r=9;t=1', '"default";r=4;t=60']


async def test_anonymous_by_client_ip_or_denied(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    by_ip = await start_gateway(**route_to(upstream), rate_limit={"max_requests": 1})
    denied = await start_gateway(**route_to(upstream), rate_limit={"max_requests": 1, "anonymous": "deny"})
    async with aiohttp.ClientSession() as client:
        assert [(await hit(client, by_ip.url + "/x", token=None)).status for _ in range(2)] == [200, 429]
        async with client.get(denied.url + "/x") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "unauthenticated"


async def _spread(urls: list[str], count: int, token: str = "tok-a") -> list[int]:
    async with aiohttp.ClientSession() as client:
        return [(await hit(client, urls[i % len(urls)] + "/v1/x", token)).status for i in range(count)]


def _two_gateways(tmp_path: Path, upstream: Upstream, rate_limit: dict[str, Any]) -> list[GatewayProcess]:
    host = upstream.url.split("://")[1]
    config = {
        "allowlist": [host],
        "routes": [{"name": "app", "prefix": "/", "upstream": upstream.url}],
        "rate_limit": rate_limit,
    }
    gateways = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        gateways.append(GatewayProcess(config, tmp_path / name))
    return gateways


@pytest.mark.redis
async def test_two_processes_share_one_limit_through_redis(tmp_path: Path, upstream: Upstream) -> None:
    redis = RedisServer(tmp_path)
    gateways = _two_gateways(tmp_path, upstream, {"max_requests": 7, "storage": redis.url})
    try:
        statuses = await _spread([g.url for g in gateways], 12)
    finally:
        for g in gateways:
            g.stop()
        redis.stop()
    assert statuses.count(200) == 7 and statuses.count(429) == 5
    assert len(upstream.recorder.requests) == 7


@pytest.mark.redis
@pytest.mark.parametrize("mode", ["allow", "deny"])
async def test_redis_outage_fails_open_or_closed_then_recovers(
    tmp_path: Path, upstream: Upstream, mode: str
) -> None:
    redis = RedisServer(tmp_path)
    rate_limit = {
        "max_requests": 3,
        "storage": redis.url,
        "on_storage_error": mode,
        "storage_timeout_ms": 200,
    }
    gateways = _two_gateways(tmp_path, upstream, rate_limit)
    urls = [g.url for g in gateways]
    try:
        assert await _spread(urls, 2) == [200, 200]
        ready_before = await _readyz(gateways)
        redis.stop()
        during = await _spread(urls, 10)
        ready_during = await _readyz(gateways)
        down = [await scrape(f"http://127.0.0.1:{g.admin_port}") for g in gateways]
        redis.start()
        after = await _reconnected(urls)
        ready_after = await _readyz(gateways)
        up = [await scrape(f"http://127.0.0.1:{g.admin_port}") for g in gateways]
    finally:
        for g in gateways:
            g.stop()
        redis.stop()
    expected = 200 if mode == "allow" else 503
    assert during == [expected] * 10
    assert after[-1] == 429  # limiting resumed without restarting the gateways
    assert ready_before == ready_after == [(200, {"status": "ready"})] * 2
    degraded = {"status": "degraded", "reason": "rate_limit_storage_unavailable", "on_storage_error": mode}
    assert ready_during == [(expected, degraded)] * 2  # a fail-closed gateway tells its load balancer
    assert [value(s, "bt_gateway_rate_limit_storage_up") for s in down] == [0, 0]
    assert [value(s, "bt_gateway_rate_limit_storage_up") for s in up] == [1, 1]
    without = [value(s, "bt_gateway_rate_limit_decisions_without_storage_total") for s in down]
    assert sum(without) == 10  # every request of the outage, on the gateway that decided it
    for g in gateways:
        assert len(g.events("rate_limit_storage_unavailable")) == 1  # once per outage, not per request
        assert len(g.events("rate_limit_storage_recovered")) == 1
        codes = {a["error_code"] for a in g.events("access") if a["status"] == 503}
        assert codes <= {"rate_limit_unavailable"}
        assert not [line for line in g.raw_lines if "Retry attempt" in line]  # the client library is quiet


async def _readyz(gateways: list[GatewayProcess]) -> list[tuple[int, dict[str, str]]]:
    async with aiohttp.ClientSession() as client:
        answers = []
        for g in gateways:
            async with client.get(f"http://127.0.0.1:{g.admin_port}/readyz") as resp:
                answers.append((resp.status, await resp.json()))
        return answers


@pytest.mark.redis
async def test_a_replica_that_stops_leaves_the_shared_counters_alone(
    tmp_path: Path, upstream: Upstream
) -> None:
    """A deploy stops replicas one by one: the others must keep every token's count."""
    redis = RedisServer(tmp_path)
    first, second = _two_gateways(tmp_path, upstream, {"max_requests": 3, "storage": redis.url})
    try:
        assert await _spread([first.url, second.url], 3) == [200, 200, 200]
        first.terminate()
        assert await asyncio.to_thread(first.wait) == 0
        assert first.events("gateway_stopped")
        assert await _spread([second.url], 1) == [429]
    finally:
        first.stop()
        second.stop()
        redis.stop()


async def test_anonymous_deny_applies_only_where_a_limit_applies(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    host = upstream.url.split("://")[1]
    gw = await start_gateway(
        allowlist=[host],
        routes=[
            {"name": "app", "prefix": "/", "upstream": upstream.url},
            {"name": "data", "prefix": "/data-plane", "upstream": upstream.url, "rate_limit": "off"},
        ],
        rate_limit={"max_requests": 5, "anonymous": "deny"},
    )
    async with aiohttp.ClientSession() as client:
        assert (await hit(client, gw.url + "/data-plane/logs3", token=None)).status == 200
        refused = await hit(client, gw.url + "/v1/x", token=None)
    assert refused.status == 401


async def _reconnected(urls: list[str]) -> list[int]:
    """After Redis restarts (empty), until both gateways count again: 3 allowed, then 429.

    Each try uses a fresh token, so a try made while the gateways were still reconnecting spends no
    quota of the next one.
    """
    statuses: list[int] = []
    for attempt in range(50):
        statuses = await _spread(urls, 4, token=f"fresh-{attempt}")
        if statuses == [200, 200, 200, 429]:
            return statuses
        await asyncio.sleep(0.1)
    return statuses


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    yield redis
    redis.stop()


@pytest.mark.redis
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gaps=st.lists(st.integers(min_value=0, max_value=4000), min_size=1, max_size=40))
def test_the_redis_moving_window_is_exact_too(shared_redis: RedisServer, gaps: list[int]) -> None:
    """The one-round-trip Lua window on a real Redis passes the same exactness property as memory."""
    key = f"tok:{uuid.uuid4()}"
    assert_exact(asyncio.run(run_arrivals(gaps, storage=shared_redis.url, key=key)))
