"""Forwarding through the real gateway to a real upstream: methods, headers, query bytes, streaming."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.clients import send_raw
from tests.conftest import Canary, GatewayFactory, Upstream, route_to


def headers_of(seen: list[Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in seen:
        out.setdefault(name.lower(), []).append(value)
    return out


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method_is_forwarded(
    start_gateway: GatewayFactory, upstream: Upstream, method: str
) -> None:
    gw = await start_gateway(**route_to(upstream))
    async with aiohttp.ClientSession() as client:
        async with client.request(method, gw.url + "/v1/thing", data=b"abc") as resp:
            body = await resp.json()
    assert resp.status == 200
    assert body["method"] == method
    assert body["body_bytes"] == 3


async def test_head_is_forwarded_without_body(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(upstream))
    async with aiohttp.ClientSession() as client, client.head(gw.url + "/download/1000") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "1000"
        assert await resp.read() == b""
    assert upstream.recorder.requests[-1].method == "HEAD"


async def test_head_and_get_alternate_on_one_upstream_connection(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    """The response parser is kept per connection and rebuilt only when a HEAD changes the framing."""
    gw = await start_gateway(**route_to(upstream))
    methods = ["GET", "HEAD", "HEAD", "GET", "GET", "HEAD", "GET"]
    async with aiohttp.ClientSession() as client:
        for method in methods:
            async with client.request(method, gw.url + "/download/1000") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Length"] == "1000"
                assert len(await resp.read()) == (1000 if method == "GET" else 0)
    seen = upstream.recorder.requests
    assert [r.method for r in seen] == methods
    assert len({r.peer_port for r in seen}) == 1  # one upstream connection carried them all


async def test_query_string_passes_byte_for_byte(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(upstream))
    raw = "/v1/x?a=%41&b=%2f%2F&c=+%20&d=&&e=%E2%98%83&f"
    async with aiohttp.ClientSession() as client, client.get(URL(gw.url + raw, encoded=True)) as resp:
        assert resp.status == 200
    assert upstream.recorder.requests[-1].raw_path == raw


async def test_prefix_is_stripped_and_longest_prefix_wins(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    host = upstream.url.split("://")[1]
    gw = await start_gateway(
        allowlist=[host],
        routes=[
            {"name": "app", "prefix": "/", "upstream": upstream.url},
            {"name": "data", "prefix": "/data-plane", "upstream": upstream.url + "/base"},
        ],
    )
    async with aiohttp.ClientSession() as client:
        for path in ("/data-plane/v1/x?q=1", "/data-plane", "/data-planex/y"):
            async with client.get(gw.url + path) as resp:
                assert resp.status == 200
    seen = [r.raw_path for r in upstream.recorder.requests]
    assert seen == ["/base/v1/x?q=1", "/base/", "/data-planex/y"]


async def test_request_headers_hop_by_hop_dropped_forwarded_added(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**route_to(upstream))
    request = (
        b"GET /echo HTTP/1.1\r\nHost: gw.example:8080\r\nConnection: keep-alive, X-Drop-Me\r\n"
        b"X-Drop-Me: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nX-Forwarded-For: 10.0.0.1\r\nVia: 1.0 corp\r\n"
        b"X-Keep: yes\r\nAuthorization: Bearer tok\r\n\r\n"
    )
    reply = await send_raw(gw.gateway.ports["listen"], request)  # keep-alive: read to the reply's framing
    assert (reply.version, reply.status) == ("HTTP/1.1", 200)
    seen = headers_of(upstream.recorder.requests[-1].headers)
    for dropped in ("x-drop-me", "keep-alive", "te", "upgrade", "proxy-authorization"):
        assert dropped not in seen, dropped
    assert seen["host"] == [f"127.0.0.1:{upstream.port}"]
    assert seen["x-forwarded-for"] == ["10.0.0.1, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["gw.example:8080"]
    assert seen["via"] == ["1.0 corp, 1.1 bt-gateway"]
    assert seen["x-keep"] == ["yes"]
    assert seen["authorization"] == ["Bearer tok"]
    for auto in ("user-agent", "accept", "accept-encoding", "content-type"):
        assert auto not in seen, f"gateway invented {auto}"


async def test_response_hop_by_hop_dropped(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(upstream))
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/hop") as resp:
        assert resp.status == 200
        assert "X-Secret-Hop" not in resp.headers
        assert "Keep-Alive" not in resp.headers
        assert resp.headers["Via"] == "1.1 bt-gateway"


async def test_content_encoding_passes_untouched(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(upstream))
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(gw.url + "/gzip") as resp:
            raw = await resp.read()
    assert resp.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(raw) == b'{"hello": "world"}'


async def test_request_id_echoed_when_sane_generated_otherwise(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**route_to(upstream))
    async with aiohttp.ClientSession() as client:
        async with client.get(gw.url + "/x", headers={"X-Request-Id": "abc-123"}) as resp:
            body = await resp.json()
        assert resp.headers["X-Request-Id"] == "abc-123"
        assert ["X-Request-ID", "abc-123"] in body["headers"]
        async with client.get(gw.url + "/x", headers={"X-Request-Id": "bad id <script>"}) as resp:
            assert resp.headers["X-Request-Id"] != "bad id <script>"
            assert len(resp.headers["X-Request-Id"]) == 32


async def test_sse_events_are_flushed_as_they_arrive(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**route_to(upstream))
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/sse") as resp:
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
        assert first == b"data: first\n\n"  # arrived while upstream still holds the second event back
        upstream.recorder.sse_gate.set()
        rest = await asyncio.wait_for(resp.content.read(), 10)
    assert rest == b"data: second\n\n"


async def test_redirect_is_returned_not_followed(
    start_gateway: GatewayFactory, upstream: Upstream, canary: Canary
) -> None:
    gw = await start_gateway(**route_to(upstream))
    async with aiohttp.ClientSession() as client:
        async with client.get(gw.url + "/redirect", allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == f"http://127.0.0.1:{canary.port}/stolen"
    assert canary.accepts == []


async def test_upstream_cookies_are_not_kept(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(upstream))
    async with aiohttp.ClientSession() as client:
        async with client.get(gw.url + "/x", headers={"Cookie": "a=1"}) as resp:
            first = await resp.json()
        async with client.get(gw.url + "/x") as resp:
            second = await resp.json()
    assert ["Cookie", "a=1"] in first["headers"]
    assert all(name.lower() != "cookie" for name, _ in second["headers"])


async def test_client_disconnect_cancels_upstream(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(upstream))
    _, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.ports["listen"])
    writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    while not upstream.recorder.requests:
        await asyncio.sleep(0.01)
    writer.close()
    await asyncio.wait_for(upstream.recorder.disconnected.wait(), 10)


async def test_keepalive_reuses_upstream_connection(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**route_to(upstream))
    async with aiohttp.ClientSession() as client:
        for _ in range(5):
            async with client.get(gw.url + "/x") as resp:
                await resp.read()
    assert len({seen.peer_port for seen in upstream.recorder.requests}) == 1  # one upstream connection


async def test_tls_upstream_verified_with_ca_bundle(
    start_gateway: GatewayFactory, tls_upstream: Upstream, ca_file: Any
) -> None:
    gw = await start_gateway(**route_to(tls_upstream), upstream={"ca_bundle": str(ca_file)})
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/x") as resp:
        body = await resp.json()
    assert resp.status == 200
    assert ["Host", f"localhost:{tls_upstream.port}"] in body["headers"]


async def test_tls_upstream_untrusted_is_502(start_gateway: GatewayFactory, tls_upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(tls_upstream))
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/x") as resp:
        body = await resp.json()
    assert resp.status == 502
    assert body["error"]["code"] == "upstream_unreachable"
    assert tls_upstream.recorder.requests == []


async def test_browser_link_to_app_redirects_to_public_url(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**route_to(upstream), public_url="https://public.example.com")
    browser = {"Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"}
    async with aiohttp.ClientSession() as client:
        path = "/app/my%20org/p/proj/experiments/e1?r=abc"
        async with client.get(
            URL(gw.url + path, encoded=True), headers=browser, allow_redirects=False
        ) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "https://public.example.com" + path
        async with client.get(gw.url + "/app/x", headers={"Accept": "application/json"}) as resp:
            assert resp.status == 200  # an API client is proxied as usual
        async with client.get(gw.url + "/apps/x", headers=browser) as resp:
            assert resp.status == 200
    assert [r.raw_path for r in upstream.recorder.requests] == ["/app/x", "/apps/x"]
