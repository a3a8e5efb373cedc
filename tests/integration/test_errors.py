"""Every failure is a JSON error with a stable code, the right status and a request id."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp

from tests.clients import assert_error, reply_of, send_raw
from tests.conftest import GatewayFactory, Upstream, route_to


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connection_refused_is_502(start_gateway: GatewayFactory) -> None:
    port = free_port()
    gw = await start_gateway(
        allowlist=[f"127.0.0.1:{port}"],
        routes=[{"name": "app", "prefix": "/", "upstream": f"http://127.0.0.1:{port}"}],
    )
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/x") as resp:
        reply = await reply_of(resp)
    assert_error(reply, 502, "upstream_unreachable")
    assert reply.headers["X-Request-Id"] == reply.json()["error"]["request_id"]


async def test_dns_failure_is_502(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(
        allowlist=["no-such-host.invalid"],
        routes=[{"name": "app", "prefix": "/", "upstream": "http://no-such-host.invalid"}],
    )
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/x") as resp:
        reply = await reply_of(resp)
    assert_error(reply, 502, "upstream_unreachable")


async def test_read_timeout_is_504(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(upstream), upstream={"read_timeout_s": 0.3})
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/hang") as resp:
        reply = await reply_of(resp)
    assert_error(reply, 504, "upstream_timeout")


async def test_declared_body_over_limit_is_413_and_not_forwarded(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**route_to(upstream), limits={"max_body_mb": 1})
    async with aiohttp.ClientSession() as client:
        async with client.post(gw.url + "/upload", data=b"x" * (1024 * 1024 + 1)) as resp:
            reply = await reply_of(resp)
    assert_error(reply, 413, "body_too_large")
    assert upstream.recorder.requests == []


async def test_chunked_body_over_limit_is_413(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(upstream), limits={"max_body_mb": 1})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    async with aiohttp.ClientSession() as client, client.post(gw.url + "/upload", data=chunks()) as resp:
        reply = await reply_of(resp)
    assert_error(reply, 413, "body_too_large")
    assert all(seen.body_bytes <= 1024 * 1024 for seen in upstream.recorder.requests)


async def test_headers_over_limit_total_is_431(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(upstream), limits={"max_header_kb": 8})
    many = "".join(f"X-Filler-{i}: {'v' * 900}\r\n" for i in range(12))
    reply = await send_raw(
        gw.gateway.ports["listen"], f"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{many}\r\n".encode()
    )
    assert_error(reply, 431, "headers_too_large")
    assert reply.headers["X-Request-Id"] == reply.json()["error"]["request_id"]
    assert upstream.recorder.requests == []


async def test_single_header_over_limit_is_431_from_parser(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**route_to(upstream), limits={"max_header_kb": 8})
    reply = await send_raw(
        gw.gateway.ports["listen"], f"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: {'v' * 9000}\r\n\r\n".encode()
    )
    assert_error(reply, 431, "headers_too_large")
    assert upstream.recorder.requests == []


async def test_garbage_request_is_400_json(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(upstream))
    reply = await send_raw(gw.gateway.ports["listen"], b"GET /x HTTP/1.1\r\nHost a\r\n\r\n")
    assert_error(reply, 400, "bad_request")


async def test_asterisk_target_is_400(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(upstream))
    reply = await send_raw(gw.gateway.ports["listen"], b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_error(reply, 400, "bad_request")
    assert upstream.recorder.requests == []


async def test_no_route_is_404(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    host = upstream.url.split("://")[1]
    gw = await start_gateway(
        allowlist=[host], routes=[{"name": "data", "prefix": "/data-plane", "upstream": upstream.url}]
    )
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/elsewhere") as resp:
        reply = await reply_of(resp)
    assert_error(reply, 404, "no_route")


async def test_upstream_dies_midstream_client_sees_truncation(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    """Once headers are sent, a failing upstream must surface as a cut connection, never a clean end."""
    gw = await start_gateway(**route_to(upstream), upstream={"read_timeout_s": 0.3})
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/sse") as resp:
        assert resp.status == 200
        try:
            await asyncio.wait_for(resp.content.read(), 10)
        except aiohttp.ClientPayloadError:
            pass
        else:
            raise AssertionError("a truncated stream was delivered as complete")
