"""Slow and many clients are bounded: head and body timeouts, idle keep-alive, connection cap, pool share.

Each bound is set small in the config so the test waits little; what is asserted is the gateway's answer
(status, code, a closed connection), never how long it took.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp

from tests.clients import assert_error, closed_by_peer, read_reply
from tests.conftest import GatewayFactory, Logs, Upstream, route_to


async def test_a_head_that_does_not_arrive_in_time_gets_408_and_close(
    start_gateway: GatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    gw = await start_gateway(**route_to(upstream, limits={"header_timeout_s": 0.3}))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.ports["listen"])
    writer.write(b"GET /slowloris HTTP/1.1\r\nHost: gw\r\nX-Dribble: ")  # and then nothing more
    await writer.drain()
    assert_error(await read_reply(reader), 408, "request_timeout")
    assert await closed_by_peer(reader)
    writer.close()
    assert upstream.recorder.started == []
    assert [e["code"] for e in logs.named("request_rejected")] == ["request_timeout"]


async def test_the_next_head_on_a_kept_alive_connection_is_bounded_too(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**route_to(upstream, limits={"header_timeout_s": 0.3}))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.ports["listen"])
    writer.write(b"GET /first HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert (await read_reply(reader)).status == 200
    writer.write(b"GET /second HTTP/1.1\r\nHo")
    assert_error(await read_reply(reader), 408, "request_timeout")
    assert await closed_by_peer(reader)
    writer.close()
    assert upstream.recorder.started == ["/first"]


async def test_a_stalled_body_gets_408(start_gateway: GatewayFactory, upstream: Upstream, logs: Logs) -> None:
    gw = await start_gateway(**route_to(upstream, limits={"body_timeout_s": 0.3}))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.ports["listen"])
    writer.write(b"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    await writer.drain()
    assert_error(await read_reply(reader), 408, "request_timeout")
    writer.close()
    event = await logs.access("/upload")
    assert (event["status"], event["error_code"], event["bytes_in"]) == (408, "request_timeout", 10)


async def test_an_idle_kept_alive_connection_is_closed(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**route_to(upstream, limits={"keepalive_timeout_s": 0.3}))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.ports["listen"])
    writer.write(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert (await read_reply(reader)).status == 200
    assert await closed_by_peer(reader)  # no second request came: the gateway hung up
    writer.close()


async def test_connections_beyond_the_cap_are_refused_at_once_and_others_unharmed(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**route_to(upstream, limits={"max_client_connections": 3}))
    port = gw.gateway.ports["listen"]
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert_error(await read_reply(reader), 503, "too_many_connections")
    assert await closed_by_peer(reader)
    writer.close()
    for held_reader, held_writer in held:  # the three open ones still work
        held_writer.write(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert (await read_reply(held_reader)).status == 200
        held_writer.close()


def client_from(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from `address` (any 127.0.0.0/8 address is this machine)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def hold_an_upstream_connection(
    client: aiohttp.ClientSession, url: str, upstream: Upstream
) -> AsyncIterator[None]:
    """An SSE request kept open upstream (gated) for as long as the caller needs it."""
    async with client.get(url + "/sse") as resp:
        assert await resp.content.readuntil(b"\n\n") == b"data: first\n\n"
        yield
        upstream.recorder.sse_gate.set()
        await resp.read()


async def test_one_client_cannot_hold_more_than_its_share_of_the_pool(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**route_to(upstream, limits={"max_connections": 2, "max_upstream_share": 0.5}))
    async with client_from("127.0.0.1") as first, client_from("127.0.0.2") as other:
        holding = hold_an_upstream_connection(first, gw.url, upstream)
        await anext(holding)
        async with first.get(gw.url + "/more") as resp:  # its one slot (half of two) is taken
            assert resp.status == 503 and (await resp.json())["error"]["code"] == "upstream_busy"
        async with other.get(gw.url + "/other") as resp:  # another address is served
            assert resp.status == 200
        await anext(holding, None)
    assert "/more" not in upstream.recorder.started


async def test_waiting_for_a_full_pool_is_bounded(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(
        **route_to(
            upstream, limits={"max_connections": 1, "max_upstream_share": 1}, upstream={"pool_timeout_s": 0.3}
        )
    )
    async with aiohttp.ClientSession() as client, aiohttp.ClientSession() as second:
        holding = hold_an_upstream_connection(client, gw.url, upstream)
        await anext(holding)
        async with second.get(gw.url + "/waits") as resp:
            assert resp.status == 503 and (await resp.json())["error"]["code"] == "upstream_busy"
        await anext(holding, None)
        async with second.get(gw.url + "/after") as resp:  # the slot came back
            assert resp.status == 200
