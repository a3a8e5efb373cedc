"""A relayed answer that arrived whole is written by the gateway itself (gateway/direct_response.py): it
keeps HTTP's framing for each client version, dates an answer that came undated, and waits for a client
that reads slowly instead of buffering without bound."""

from __future__ import annotations

import asyncio
import socket
from email.utils import parsedate_to_datetime

import pytest
from aiohttp import web

from gateway import direct_response
from tests.clients import HANG_GUARD_S, closed_by_peer, read_reply, send_raw
from tests.conftest import GatewayFactory, RawUpstream, route_to

BODY = b'{"ok": true}'
UNDATED = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


@pytest.mark.parametrize(
    ("version", "connection", "sent", "stays_open"),
    [
        ("HTTP/1.1", None, None, True),
        ("HTTP/1.1", "close", "close", False),
        ("HTTP/1.0", None, None, False),
        ("HTTP/1.0", "keep-alive", "keep-alive", True),
    ],
)
async def test_a_whole_answer_keeps_the_framing_the_clients_version_asks_for(
    start_gateway: GatewayFactory,
    raw_upstream: RawUpstream,
    version: str,
    connection: str | None,
    sent: str | None,
    stays_open: bool,
) -> None:
    raw_upstream.replies["/x"] = UNDATED
    gw = await start_gateway(**route_to(raw_upstream))  # type: ignore[arg-type]
    field = f"Connection: {connection}\r\n" if connection else ""
    request = f"GET /x {version}\r\nHost: gw\r\n{field}\r\n".encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.ports["listen"])
    try:
        writer.write(request)
        reply = await read_reply(reader)
        assert (reply.version, reply.status, reply.body) == (version, 200, BODY)
        assert reply.headers.get("Connection") == sent
        assert "Server" not in reply.headers and "Content-Type" not in reply.headers  # none of aiohttp's
        if stays_open:
            writer.write(request)
            assert (await read_reply(reader)).body == BODY
        else:
            assert await closed_by_peer(reader)
    finally:
        writer.close()


async def test_an_undated_answer_is_dated_and_a_dated_one_keeps_its_date(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    date = "Sun, 06 Nov 1994 08:49:37 GMT"
    raw_upstream.replies["/undated"] = UNDATED
    dated_reply = f"HTTP/1.1 200 OK\r\nDate: {date}\r\nContent-Length: 2\r\n\r\nok"
    raw_upstream.replies["/dated"] = dated_reply.encode()
    gw = await start_gateway(**route_to(raw_upstream))  # type: ignore[arg-type]
    port = gw.gateway.ports["listen"]
    undated = await send_raw(port, b"GET /undated HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    dated = await send_raw(port, b"GET /dated HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert len(undated.headers.getall("Date")) == 1
    assert parsedate_to_datetime(undated.headers["Date"]).tzname() == "UTC"
    assert dated.headers.getall("Date") == [date]


async def test_a_client_that_does_not_read_holds_the_answer_until_it_does() -> None:
    """Past the transport's high-water mark the writer waits for the client, as aiohttp's write_eof does,
    so a client that reads nothing (while it pipelines requests, say) cannot make the gateway buffer
    answer after answer without bound."""
    body = b"b" * 2**23  # far more than the kernel buffers of a client with a small receive window
    written = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        response = await direct_response.send(request, head, body, keep_alive=True)
        written.set()
        return response

    runner = web.ServerRunner(web.Server(handler), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2**14)
    client.setblocking(False)
    try:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(client, ("127.0.0.1", port))
        await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(HANG_GUARD_S):
            while not _paused(runner):  # the transport holds more than its high-water mark
                await asyncio.sleep(0.01)
        assert not written.is_set()
        reader, writer = await asyncio.open_connection(sock=client)
        reply = await read_reply(reader)
        assert reply.body == body
        async with asyncio.timeout(HANG_GUARD_S):
            await written.wait()
        writer.close()
    finally:
        await runner.cleanup()


def _paused(runner: web.ServerRunner) -> bool:
    server = runner.server
    assert server is not None
    return any(protocol.writing_paused for protocol in server.connections)
