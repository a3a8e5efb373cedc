"""Every failure is a JSON error with a stable code, the right status and a request id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp

from tests.clients import assert_error, free_port, reply_of, send_raw
from tests.conftest import GatewayFactory, Logs, Upstream, route_to
from tests.upstream_app import DRIP


async def test_connection_refused_is_502_and_the_log_says_why(
    start_gateway: GatewayFactory, logs: Logs
) -> None:
    port = free_port()
    gw = await start_gateway(
        allowlist=[f"127.0.0.1:{port}"],
        routes=[{"name": "app", "prefix": "/", "upstream": f"http://127.0.0.1:{port}"}],
    )
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/x") as resp:
        reply = await reply_of(resp)
    assert_error(reply, 502, "upstream_unreachable")
    assert reply.headers["X-Request-Id"] == reply.json()["error"]["request_id"]
    event = await logs.access("/x")
    assert event["reason"] == "connection_refused"
    assert event["upstream"] == "127.0.0.1"
    assert f"127.0.0.1', {port})" in event["cause"]  # the address it tried, for the operator


async def test_dns_failure_is_502_and_the_log_says_why(start_gateway: GatewayFactory, logs: Logs) -> None:
    gw = await start_gateway(
        allowlist=["no-such-host.invalid"],
        routes=[{"name": "app", "prefix": "/", "upstream": "http://no-such-host.invalid"}],
    )
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/x") as resp:
        reply = await reply_of(resp)
    assert_error(reply, 502, "upstream_unreachable")
    assert reply.json()["error"]["message"] == "upstream host name did not resolve: no-such-host.invalid"
    event = await logs.access("/x")
    assert event["reason"] == "dns_failure" and event["upstream"] == "no-such-host.invalid"


async def test_untrusted_tls_is_502_and_the_log_says_why(
    start_gateway: GatewayFactory, tls_upstream: Upstream, logs: Logs
) -> None:
    gw = await start_gateway(**route_to(tls_upstream))  # no ca_bundle: the test CA is not trusted
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/x") as resp:
        reply = await reply_of(resp)
    assert_error(reply, 502, "upstream_unreachable")
    assert reply.json()["error"]["message"] == "upstream TLS certificate was not trusted: localhost"
    event = await logs.access("/x")
    assert event["reason"] == "tls_verification" and "certificate verify failed" in event["cause"]
    assert tls_upstream.recorder.requests == []


async def test_read_timeout_is_504_and_the_log_says_why(
    start_gateway: GatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    gw = await start_gateway(**route_to(upstream), upstream={"read_timeout_s": 0.3})
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/hang") as resp:
        reply = await reply_of(resp)
    assert_error(reply, 504, "upstream_timeout")
    assert (await logs.access("/hang"))["reason"] == "read_timeout"


async def test_the_read_timeout_bounds_silence_not_a_slow_answer(
    start_gateway: GatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    """A byte every 0.05 s for three times the timeout: each read moves the deadline (the timer, firing
    at the first one, waits out the rest), so the answer arrives whole."""
    gw = await start_gateway(**route_to(upstream), upstream={"read_timeout_s": 0.5})
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/drip") as resp:
        assert resp.status == 200
        assert await resp.read() == b"x" * DRIP
    event = await logs.access("/drip")
    assert (event["status"], event["error_code"], event["bytes_out"]) == (200, None, DRIP)


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


async def test_no_route_is_404(start_gateway: GatewayFactory, upstream: Upstream, logs: Logs) -> None:
    host = upstream.url.split("://")[1]
    gw = await start_gateway(
        allowlist=[host], routes=[{"name": "data", "prefix": "/data-plane", "upstream": upstream.url}]
    )
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/elsewhere") as resp:
        reply = await reply_of(resp)
    assert_error(reply, 404, "no_route")
    assert (await logs.access("/elsewhere"))["reason"] == "no_route"


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


# --- clients that leave ------------------------------------------------------------------------------


async def test_a_client_leaving_mid_response_is_499_not_an_upstream_fault(
    start_gateway: GatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    gw = await start_gateway(**route_to(upstream))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.ports["listen"])
    writer.write(b"GET /download/1073741824 HTTP/1.1\r\nHost: gw\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(2**20)  # the body is flowing
    writer.transport.abort()  # the client goes away (RST)
    event = await logs.access("/download/1073741824")
    assert (event["status"], event["error_code"], event["upstream_status"]) == (
        499,
        "client_disconnected",
        200,
    )
    assert "client:disconnected" in event["decisions"]
    assert logs.named("unhandled_error") == []


async def test_a_client_leaving_mid_upload_is_499_not_an_upstream_fault(
    start_gateway: GatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    gw = await start_gateway(**route_to(upstream))
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.ports["listen"])
    writer.write(b"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 65536)
    await writer.drain()
    async with asyncio.timeout(15):  # the upload is flowing when the client leaves
        while not upstream.recorder.started:
            await asyncio.sleep(0.01)
    writer.transport.abort()
    event = await logs.access("/upload")
    assert (event["status"], event["error_code"]) == (499, "client_disconnected")
    assert logs.named("unhandled_error") == []


async def test_a_client_leaving_before_100_continue_is_499(
    start_gateway: GatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    gw = await start_gateway(**route_to(upstream))
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.ports["listen"])
    writer.write(b"PUT /upload HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n")
    await writer.drain()
    writer.transport.abort()
    event = await logs.access("/upload")
    assert (event["status"], event["error_code"]) == (499, "client_disconnected")
    assert logs.named("unhandled_error") == []
    assert upstream.recorder.requests == []


# --- what the gateway says about itself -----------------------------------------------------------


async def test_own_responses_say_bt_gateway_and_relayed_ones_add_nothing(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    async def bare(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # no Server, no Content-Type
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(bare, "127.0.0.1", 0)
    bare_port = server.sockets[0].getsockname()[1]
    host = upstream.url.split("://")[1]
    gw = await start_gateway(
        allowlist=[host, f"127.0.0.1:{bare_port}"],
        routes=[
            {"name": "app", "prefix": "/", "upstream": upstream.url},
            {"name": "bare", "prefix": "/bare", "upstream": f"http://127.0.0.1:{bare_port}"},
        ],
    )
    try:
        port = gw.gateway.ports["listen"]
        refused = await send_raw(port, b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n\r\n")  # the parser's 400
        denied = await send_raw(port, b"GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n")
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{gw.gateway.ports['admin']}/healthz") as admin:
                pass
            async with client.get(gw.url + "/bare/x") as relayed:
                assert await relayed.read() == b"ok"
            async with client.get(gw.url + "/x") as from_aiohttp:
                pass
    finally:
        server.close()
        await server.wait_closed()
    assert (refused.status, denied.status) == (400, 403)
    assert refused.headers["Server"] == denied.headers["Server"] == "bt-gateway"
    assert admin.headers["Server"] == "bt-gateway"
    assert "Server" not in relayed.headers and "Content-Type" not in relayed.headers
    assert from_aiohttp.headers["Server"].startswith("Python/")  # the upstream's own header, kept
