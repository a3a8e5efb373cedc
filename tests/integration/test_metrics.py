"""`GET /metrics` on the admin listener: exact counts for a known mix of traffic, and bounded labels."""

from __future__ import annotations

import aiohttp

from gateway import __version__
from tests.clients import raw_connect, read_reply, scrape, send_raw, value
from tests.conftest import GatewayFactory, Logs, Upstream, route_to

TOKEN = "sk-metrics-token-never-a-label"


async def test_a_known_mix_is_counted_exactly(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(upstream), rate_limit={"max_requests": 3})
    port = gw.gateway.ports["listen"]
    received = 0
    async with aiohttp.ClientSession() as client:
        for _ in range(5):  # 3 allowed, 2 rate-limited
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with client.post(gw.url + "/v1/rows", data=b"0123456789", headers=headers) as resp:
                body = await resp.read()
                received += len(body) if resp.status == 200 else 0
    denied = await send_raw(port, b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    async with raw_connect(port, "evil.example:443") as (refused, _, _):
        pass
    assert (denied.status, refused.status) == (403, 403)

    samples = await scrape(gw.admin_url)
    requests = "bt_gateway_requests_total"
    assert value(samples, requests, route="app", status="200") == 3
    assert value(samples, requests, route="app", status="429") == 2
    assert value(samples, requests, route="forward_proxy", status="403") == 1
    assert value(samples, requests, route="tunnel", status="403") == 1
    assert sum(v for (name, _), v in samples.items() if name == requests) == 7
    assert value(samples, "bt_gateway_refusals_total", code="rate_limited") == 2
    assert value(samples, "bt_gateway_refusals_total", code="egress_denied") == 2
    assert value(samples, "bt_gateway_upstream_duration_seconds_count", route="app") == 3
    assert value(samples, "bt_gateway_bytes_total", route="app", direction="in") == 30
    assert value(samples, "bt_gateway_bytes_total", route="app", direction="out") == received > 0
    assert value(samples, "bt_gateway_tunnels_active") == 0
    assert value(samples, "bt_gateway_rate_limit_storage_errors_total") == 0
    assert value(samples, "bt_gateway_config_reloads_total", result="failure") == 0
    assert value(samples, "bt_gateway_build_info", version=__version__) == 1
    label_values = {v for (_, labels) in samples for _, v in labels}
    for secret_or_unbounded in (TOKEN, "/v1/rows", "127.0.0.1", "evil.example"):
        assert not [v for v in label_values if secret_or_unbounded in v]


async def test_tunnels_are_counted_by_close_reason(
    start_gateway: GatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    target = f"127.0.0.1:{upstream.port}"
    gw = await start_gateway(
        **route_to(upstream), forward_proxy={"connect_ports": [upstream.port], "idle_timeout_s": 30}
    )
    async with raw_connect(gw.gateway.ports["listen"], target) as (answer, reader, writer):
        assert answer.status == 200
        assert value(await scrape(gw.admin_url), "bt_gateway_tunnels_active") == 1
        writer.write(b"GET /through HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await read_reply(reader)).status == 200
    await logs.access(target)  # the tunnel ended and was accounted
    samples = await scrape(gw.admin_url)
    assert value(samples, "bt_gateway_tunnels_active") == 0
    assert value(samples, "bt_gateway_tunnels_total", reason="closed") == 1
    assert value(samples, "bt_gateway_requests_total", route="tunnel", status="200") == 1
