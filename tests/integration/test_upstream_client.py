"""The gateway's own upstream client against sloppy and hostile upstreams: no response ever reaches the wrong
client, close-delimited bodies arrive whole, a stale pooled connection is not the client's problem, and an
upstream that answers early or stops reading an upload neither hangs the request nor holds its slot."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.clients import HANG_GUARD_S, Reply, assert_error, read_reply, send_raw
from tests.conftest import GatewayFactory, Logs, RawUpstream, Script, route_to


def ok(body: bytes, *fields: bytes) -> bytes:
    return b"\r\n".join((b"HTTP/1.1 200 OK", *fields, b"Content-Length: %d" % len(body), b"", body))


def own_answer(path: str) -> bytes:
    """What the upstream answers each well-behaved request: its own path, so a crossing shows."""
    return ok(f"for {path}".encode())


async def ask(port: int, method: str, path: str, body: bytes = b"") -> Reply:
    """One request on a fresh client connection (each client its own): method, path, optional body."""
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    request = f"{method} {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n".encode() + length + b"\r\n"
    return await send_raw(port, request + body, head_only=method == "HEAD")


def answer_then(first: bytes, later: bytes, relayed: asyncio.Event, sent: asyncio.Event) -> Script:
    """Answer with `first`; once the test saw it relayed, send `later` on the same connection and keep it."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(first)
        await writer.drain()
        await relayed.wait()
        writer.write(later)
        await writer.drain()
        sent.set()
        return True

    return script


# Part of an answer after the end of a response, as a later segment: kept, it would be completed by the
# next request's answer and relayed to that client in its place.
FOREIGN = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n"
ENDED = {  # responses whose end comes before bytes the upstream still sends
    "head-with-body": ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
    "204-with-body": ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
    "304-with-body": ("GET", b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n'),
    "longer-than-length": ("GET", ok(b"ok")),
}


@pytest.mark.parametrize("ended", sorted(ENDED))
async def test_bytes_after_a_response_never_reach_the_next_client(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, ended: str
) -> None:
    method, first = ENDED[ended]
    relayed, sent = asyncio.Event(), asyncio.Event()
    raw_upstream.replies["/first"] = answer_then(first, FOREIGN, relayed, sent)
    for n in range(2, 5):
        raw_upstream.replies[f"/n/{n}"] = own_answer(f"/n/{n}")
    gw = await start_gateway(**route_to(raw_upstream))  # type: ignore[arg-type]
    port = gw.gateway.ports["listen"]

    reply = await ask(port, method, "/first")
    assert (reply.status, reply.body) == (
        int(first.split(b" ")[1]),
        b"ok" if ended == "longer-than-length" else b"",
    )
    relayed.set()
    async with asyncio.timeout(HANG_GUARD_S):
        await sent.wait()
    for n in range(2, 5):  # clients one after another, each on the pool's connection if it is kept
        reply = await ask(port, "GET", f"/n/{n}")
        assert (reply.status, reply.body) == (200, f"for /n/{n}".encode())
    assert len(raw_upstream.connections) == 2  # the tainted connection was closed, the next one kept


def close_delimited(first_line: bytes) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(first_line + b"\r\nContent-Type: text/plain\r\n\r\nthe whole ")
        await writer.drain()
        writer.write(b"body, ended by the close")
        return False  # the close ends the body

    return script


@pytest.mark.parametrize("first_line", [b"HTTP/1.0 200 OK", b"HTTP/1.1 200 OK"])
async def test_a_body_ended_by_the_close_arrives_whole(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, logs: Logs, first_line: bytes
) -> None:
    raw_upstream.replies["/eof"] = close_delimited(first_line)
    gw = await start_gateway(**route_to(raw_upstream))  # type: ignore[arg-type]
    reply = await ask(gw.gateway.ports["listen"], "GET", "/eof")
    assert (reply.status, reply.body) == (200, b"the whole body, ended by the close")
    event = await logs.access("/eof")
    assert event["status"] == 200 and event["bytes_out"] == len(reply.body)


def body_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def closes_on_second_request(served: list[str]) -> Script:
    """Answer the first request on a connection; close the connection when a second one arrives on it,
    as an upstream whose keep-alive timer fired just as the request was on its way."""
    per_connection: dict[str, int] = {}

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
        peer = str(writer.get_extra_info("peername"))
        count = per_connection[peer] = per_connection.get(peer, 0) + 1
        if count > 1:
            return False
        served.append(head.split(b" ", 1)[0].decode())
        await reader.readexactly(body_length(head))
        writer.write(own_answer("/r"))
        await writer.drain()
        return True

    return script


@pytest.mark.parametrize(("method", "body"), [("GET", b""), ("PUT", b"idempotent upload")])
async def test_a_stale_pooled_connection_is_replaced_for_a_request_that_can_be_sent_again(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, method: str, body: bytes
) -> None:
    served: list[str] = []
    raw_upstream.replies["/r"] = closes_on_second_request(served)
    gw = await start_gateway(**route_to(raw_upstream))  # type: ignore[arg-type]
    port = gw.gateway.ports["listen"]
    assert (await ask(port, method, "/r", body)).status == 200
    reply = await ask(port, method, "/r", body)  # on the pooled connection, which the upstream closes
    assert (reply.status, reply.body) == (200, b"for /r")
    assert len(raw_upstream.connections) == 2 and served == [method, method]


@pytest.mark.parametrize("body", [b"not idempotent", b""], ids=["with-body", "without-body"])
async def test_a_post_whose_request_went_out_is_not_sent_twice(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, body: bytes
) -> None:
    """The upstream may have acted on it before closing: only a request of which nothing was written, or
    an idempotent one, is sent again."""
    served: list[str] = []
    raw_upstream.replies["/r"] = closes_on_second_request(served)
    gw = await start_gateway(**route_to(raw_upstream))  # type: ignore[arg-type]
    port = gw.gateway.ports["listen"]
    assert (await ask(port, "POST", "/r", body)).status == 200
    assert_error(await ask(port, "POST", "/r", body), 502, "upstream_unreachable")
    assert len(raw_upstream.connections) == 1 and served == ["POST"]


async def test_the_pool_drops_a_connection_before_the_upstreams_keep_alive_does(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    """The upstream says `Keep-Alive: timeout=1` and keeps its word; a request on a connection it has
    timed out would race its close. The gateway no longer offers it one."""
    expired = asyncio.Event()
    timed_out: set[str] = set()  # connections past their keep-alive (by the gateway's address)
    late: list[bytes] = []

    def expire(peer: str) -> None:
        timed_out.add(peer)
        expired.set()

    async def keeps_its_word(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
        peer = str(writer.get_extra_info("peername"))
        if peer in timed_out:
            late.append(head)  # a request on a connection past its keep-alive: the race the pool avoids
        writer.write(ok(b"fresh", b"Keep-Alive: timeout=1"))
        await writer.drain()
        asyncio.get_running_loop().call_later(1, expire, peer)
        return True

    raw_upstream.replies["/k"] = keeps_its_word
    gw = await start_gateway(**route_to(raw_upstream))  # type: ignore[arg-type]
    port = gw.gateway.ports["listen"]
    assert (await ask(port, "GET", "/k")).status == 200
    async with asyncio.timeout(HANG_GUARD_S):
        await expired.wait()
    assert (await ask(port, "GET", "/k")).status == 200
    assert late == [] and len(raw_upstream.connections) == 2


@contextlib.asynccontextmanager
async def uploading(port: int, path: str, size: int) -> AsyncIterator[tuple[asyncio.StreamReader, list[int]]]:
    """A client streaming a `size`-byte body in 64 KiB pieces while the test reads the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    written = [0]

    async def upload() -> None:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: {size}\r\n\r\n".encode())
        piece = b"x" * 2**16
        with contextlib.suppress(ConnectionError):
            while written[0] < size:
                writer.write(piece)
                await writer.drain()
                written[0] += len(piece)

    task = asyncio.create_task(upload())
    try:
        yield reader, written
    finally:
        task.cancel()
        writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await task


async def stall(writer: asyncio.StreamWriter, held: list[asyncio.StreamWriter]) -> bool:
    """Hold the connection open, reading nothing, until the test ends. `held` (the test's) keeps the writer
    referenced: once its reading is paused nothing else does, and the collector would close (reset) it."""
    held.append(writer)
    await asyncio.Event().wait()
    return False


def answers_early(then_close: bool, held: list[asyncio.StreamWriter]) -> Script:
    """Answer 413 on the head alone; then close (after a graceful end of its side), or just stop reading."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(
            b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 8\r\n\r\ntoo big!"
        )
        await writer.drain()
        if then_close:
            writer.write_eof()
            return False
        return await stall(writer, held)

    return script


UPLOAD = 64 * 2**20  # far more than socket buffers hold: the upload cannot have finished


@pytest.mark.parametrize("then_close", [False, True], ids=["stops-reading", "closes"])
async def test_an_answer_before_the_upload_ends_is_relayed_and_the_upload_stops(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, logs: Logs, then_close: bool
) -> None:
    held: list[asyncio.StreamWriter] = []
    raw_upstream.replies["/upload"] = answers_early(then_close, held)
    gw = await start_gateway(**route_to(raw_upstream), limits={"max_body_mb": 1024})  # type: ignore[arg-type]
    async with uploading(gw.gateway.ports["listen"], "/upload", UPLOAD) as (reader, _):
        reply = await read_reply(reader)
    assert (reply.status, reply.body) == (413, b"too big!")
    event = await logs.access("/upload")
    assert event["status"] == 413 and event["bytes_in"] < UPLOAD
    raw_upstream.replies["/next"] = own_answer("/next")  # the upload's connection is not used again
    assert (await ask(gw.gateway.ports["listen"], "GET", "/next")).body == b"for /next"
    assert len(raw_upstream.connections) == 2


async def test_an_upstream_that_stops_reading_an_upload_gets_a_write_timeout(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, logs: Logs
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
        return await stall(writer, held)

    raw_upstream.replies["/upload"] = never_reads
    gw = await start_gateway(
        **route_to(raw_upstream),  # type: ignore[arg-type]
        upstream={"write_timeout_s": 0.5, "read_timeout_s": 60},
        limits={"max_body_mb": 1024},
    )
    async with uploading(gw.gateway.ports["listen"], "/upload", UPLOAD) as (reader, _):
        reply = await read_reply(reader)
    assert_error(reply, 504, "upstream_timeout")
    event = await logs.access("/upload")
    assert event["reason"] == "write_timeout"


async def test_an_answer_that_does_not_refuse_lets_the_upload_finish(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    """Some upstreams send their head first and read the body after (a streaming handler): the whole body
    still goes up, and the answer streams back beside it."""
    size = 4 * 2**20

    async def head_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        received = len(await reader.readexactly(body_length(head)))
        text = b"got %d" % received
        writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(text), text))
        await writer.drain()
        return True

    raw_upstream.replies["/stream"] = head_first
    gw = await start_gateway(**route_to(raw_upstream))  # type: ignore[arg-type]
    async with uploading(gw.gateway.ports["listen"], "/stream", size) as (reader, _):
        reply = await read_reply(reader)
    assert (reply.status, reply.body) == (200, b"got %d" % size)


async def test_an_interim_answer_then_silence_is_a_read_timeout(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, logs: Logs
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def hints_then_nothing(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes
    ) -> bool:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        await writer.drain()
        return await stall(writer, held)

    raw_upstream.replies["/hints"] = hints_then_nothing
    gw = await start_gateway(**route_to(raw_upstream), upstream={"read_timeout_s": 0.5})  # type: ignore[arg-type]
    assert_error(await ask(gw.gateway.ports["listen"], "GET", "/hints"), 504, "upstream_timeout")
    assert (await logs.access("/hints"))["reason"] == "read_timeout"
