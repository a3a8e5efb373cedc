"""The lean upstream client: pooled HTTP/1.1 keep-alive connections, one write per request head.

aiohttp's `ClientSession` builds a `ClientRequest` per call (auto headers, cookies, redirects, proxy and
trace hooks) that a proxy never uses; here a request head is serialized once into bytes and written with
one call, and the response is parsed by aiohttp's own C parser (its `ResponseHandler` protocol, with the
read timeout and flow control that come with it). The allow-list is checked where each connection is
opened, and names resolve through the gateway's resolver (which checks it again). The corporate-proxy case
(`upstream.proxy`) keeps aiohttp's session, which knows how to chain through it.

A connection goes back to the pool only when its exchange ended exactly: the whole request was sent, the
response ended at its framing, and no byte followed it. A byte arriving while the connection is idle, or
waiting in its socket when it is picked, closes it: otherwise the rest of one answer would become the next
client's response. A pooled connection found closed before any response byte is replaced once, when the
request can be sent again. The body goes out from a task of its own while the head is awaited, so an
upstream that answers before reading the whole upload has its answer relayed and the upload stops.
"""

from __future__ import annotations

import asyncio
import math
import os
import select
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy
from yarl import URL

from gateway.aiohttp_internals import ClientProtocol
from gateway.errors import GatewayError, GatewayFailure
from gateway.upstream import ConnectTimeout, EgressGuard, EgressResolver, NameNotResolved, WriteTimeout

IDLE_S = 15.0  # a pooled connection unused this long is closed rather than reused
CHUNK_END = b"0\r\n\r\n"
REPLAY_LIMIT = 2**16  # body bytes of an idempotent request kept to send it again on a fresh connection
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
Key = tuple[str, str, int, bool]  # scheme, host, port, and whether each address was vetted
# Whether a name may be reached at the address it resolved to (forward_proxy.deny_private_addresses).
AddressCheck = Callable[[str, str], GatewayError | None]


@dataclass(frozen=True, slots=True)
class ClientSettings:
    connect_timeout_s: float
    read_timeout_s: float
    write_timeout_s: float
    max_line_size: int
    max_field_size: int
    max_idle: int  # pooled idle connections kept, over all upstreams


class UpstreamProtocol(ClientProtocol):
    """One upstream connection, knowing what the pool must know to reuse it."""

    in_flight = False  # a request is on this connection, until its response is closed
    sent = False  # the whole request reached the transport
    received = 0  # bytes received since the request went out
    wrote = False  # a byte of the request reached the transport
    answered = False  # the final response head arrived
    fd = -1
    plain = False  # no TLS: bytes in the socket are HTTP
    _poll: select.poll | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        self.plain = transport.get_extra_info("sslcontext") is None
        if sock is not None:
            self.fd = sock.fileno()
            self._poll = select.poll()  # (not select(): it fails on descriptors past 1023)
            self._poll.register(self.fd, select.POLLIN)

    def connection_lost(self, exc: BaseException | None) -> None:
        if exc is not None and self.in_flight and self.plain:
            self._read_what_is_left()
        super().connection_lost(exc)

    def _read_what_is_left(self) -> None:
        """A write failed: an upstream that answered and closed without reading the upload reset the
        connection, and asyncio gives up on a failed write before it reads. The answer still waits in the
        socket (closed only after this call); read it, a bounded amount, so it can be relayed."""
        for _ in range(16):
            try:
                data = os.read(self.fd, 2**16)
            except OSError:
                return
            if not data:
                return
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if not self.in_flight and data:  # nothing was asked: the tail of an answer already relayed
            self.close()
            return
        self.received += len(data)
        super().data_received(data)

    def begin(self) -> None:
        self.in_flight, self.sent, self.received, self.wrote, self.answered = True, False, 0, False, False

    def send(self, data: bytes) -> None:
        """Write request bytes; ConnectionResetError once the connection is closed (not a dead write)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the upstream connection closed")
        transport.write(data)
        self.wrote = True

    def upload_ended(self, task: asyncio.Task[None]) -> None:
        """A failed upload ends the wait for the head with its error (an answer already read still wins);
        after the head, it ends the connection, so the response's reader sees its body cut short."""
        if task.cancelled() or (exc := task.exception()) is None:
            return
        if not self.answered:
            self.set_exception(exc)
        elif self.transport is not None:
            self.transport.close()

    def readable(self) -> bool:
        """Bytes (or the upstream's close) wait in the socket, not yet seen by the event loop."""
        return self._poll is None or bool(self._poll.poll(0))


class Upload:
    """A request body on its way upstream; an idempotent one is kept (up to REPLAY_LIMIT) to be sent again."""

    __slots__ = ("_body", "_kept", "_kept_size", "chunked", "source_failed", "started")

    def __init__(self, body: AsyncIterator[bytes], *, chunked: bool, keep: bool) -> None:
        self._body = body
        self._kept: list[bytes] | None = [] if keep else None
        self._kept_size = 0
        self.chunked = chunked
        self.started = False  # a body byte was taken from the client
        self.source_failed = False  # the client's side broke: nothing to send again

    async def chunks(self) -> AsyncIterator[bytes]:
        """What was kept, then the rest of the body as the client sends it."""
        for chunk in list(self._kept or ()):
            yield chunk
        while True:
            try:
                chunk = await anext(self._body)
            except StopAsyncIteration:
                return
            except BaseException:  # broken, or cancelled mid-read: either way the body cannot go on
                self.source_failed = True
                raise
            self.started = True
            if self._kept is not None:
                self._kept_size += len(chunk)
                if self._kept_size <= REPLAY_LIMIT:
                    self._kept.append(chunk)
                else:
                    self._kept = None
            yield chunk

    def can_resend(self) -> bool:
        """The body can go out again from its first byte: none was taken yet, or all of it was kept."""
        return not self.source_failed and (not self.started or self._kept is not None)


class UpstreamResponse:
    """A response head and its streaming body; `close()` returns a drained connection to the pool.

    The head's fields are plain attributes, read on every request: no property call each.
    """

    __slots__ = (
        "_client",
        "_key",
        "_protocol",
        "_upload",
        "content",
        "content_length",
        "headers",
        "raw_headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        client: HttpClient,
        key: Key,
        protocol: UpstreamProtocol,
        message: RawResponseMessage,
        content: StreamReader,
        *,
        upload: asyncio.Task[None] | None,
    ) -> None:
        self._client = client
        self._key = key
        self._protocol: UpstreamProtocol | None = protocol
        self._upload = upload  # still sending the body the upstream answered early (and without refusing)
        self.content = content
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.raw_headers: tuple[tuple[bytes, bytes], ...] = message.raw_headers
        length = message.headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None

    def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if self._upload is not None:
            self._upload.cancel()  # the answer is over: the rest of the body has no one to go to
        if protocol is not None:
            keep_alive = self.headers.get("Keep-Alive")
            keep_s = IDLE_S if keep_alive is None else keep_alive_s(keep_alive)
            self._client.release(self._key, protocol, ended=self.content.is_eof(), keep_s=keep_s)


class HttpClient:
    """Pooled HTTP/1.1 to the allow-listed upstreams of one generation."""

    def __init__(
        self, guard: EgressGuard, resolver: EgressResolver, tls: ssl.SSLContext, settings: ClientSettings
    ) -> None:
        self._guard = guard
        self._resolver = resolver
        self._tls = tls
        self._settings = settings
        self._parser_settings = {
            "auto_decompress": False,
            "read_until_eof": True,  # a body framed by neither length nor chunks ends at the close
            "read_timeout": settings.read_timeout_s,
            "read_bufsize": 2**16,
            "max_line_size": settings.max_line_size,
            "max_field_size": settings.max_field_size,
            "max_headers": 256,
        }
        self._idle: dict[Key, list[tuple[float, UpstreamProtocol]]] = {}
        self._idle_count = 0
        self._closed = False

    async def request(
        self,
        method: str,
        url: URL,
        headers: Iterable[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
        *,
        chunked: bool,
        vet: AddressCheck | None = None,
    ) -> UpstreamResponse:
        """Send one request (head in one write, body streamed) and wait for the response head.

        A pooled connection that turns out closed before any response byte is replaced once, when the
        request can be sent again: an idempotent one (its body, if any, still kept), or one of which no
        byte was written (aiohttp's rule, and Go's). With `vet`, each address the name resolves to must
        pass it (the forward proxy's private-address rule, where the connection is made); such connections
        are pooled apart from those made without it.
        """
        assert url.raw_host is not None and url.port is not None
        key = (url.scheme, url.raw_host, url.port, vet is not None)
        head = _head(method, url, headers)
        idempotent = method in IDEMPOTENT
        upload = None if body is None else Upload(body, chunked=chunked, keep=idempotent)
        protocol = self._pooled(key)
        reused = protocol is not None  # (not `or`: an idle protocol is an empty queue, and so falsy)
        if protocol is None:
            protocol = await self._connect(key, vet)
        head_only = method == "HEAD"
        while True:
            try:
                protocol.use_parser(head_only, self._parser_settings)
                protocol.begin()
                if upload is None:  # most requests, written here: no coroutine of its own per request
                    protocol.send(head)
                    protocol.sent = True
                    protocol.start_timeout()
                    message, content = await protocol.read()
                    if message.code < 200:
                        message, content = await _final_head(protocol, message, content)
                    protocol.answered = True
                    uploading = None
                else:
                    message, content, uploading = await self._exchange(protocol, head, upload)
            except (aiohttp.ClientConnectionError, ConnectionError) as exc:
                protocol.close()
                stale = reused and protocol.received == 0 and not isinstance(exc, TimeoutError)
                resendable = (upload is None or upload.can_resend()) and (idempotent or not protocol.wrote)
                if not (stale and resendable):
                    raise
                reused = False
                protocol = await self._connect(key, vet)
                continue
            except BaseException:
                protocol.close()
                raise
            return UpstreamResponse(self, key, protocol, message, content, upload=uploading)

    async def _exchange(
        self, protocol: UpstreamProtocol, head: bytes, upload: Upload
    ) -> tuple[RawResponseMessage, StreamReader, asyncio.Task[None] | None]:
        """Write the request and its body (from a task) and read the response head, with the upload still
        running if it is.

        An answer before the whole body went out stops the upload when it refuses (4xx, 5xx) or closes
        the connection (RFC 9112 9.3's advice); any other answer lets it go on beside the response.
        """
        task = asyncio.get_running_loop().create_task(self._upload(protocol, head, upload))
        task.add_done_callback(protocol.upload_ended)
        try:
            message, content = await protocol.read()
            if message.code < 200:
                message, content = await _final_head(protocol, message, content)
            protocol.answered = True
        except BaseException:
            await _stop(task)  # stopped before the body could be read again, or not at all
            raise
        if task.done():
            return message, content, None
        if message.code >= 400 or message.should_close:
            await _stop(task)
            return message, content, None
        return message, content, task

    async def _upload(self, protocol: UpstreamProtocol, head: bytes, upload: Upload) -> None:
        """The head with the first body bytes, then the rest, each wait for the upstream bounded."""
        pending = head
        chunked = upload.chunked
        async for chunk in upload.chunks():
            data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
            protocol.send(pending + data if pending else data)
            pending = b""
            if protocol.writing_paused:
                await self._drain(protocol)
        protocol.send(pending + CHUNK_END if chunked else pending)
        protocol.sent = True
        if not protocol.answered:
            protocol.start_timeout()  # the wait for the answer starts once the request is out

    async def _drain(self, protocol: UpstreamProtocol) -> None:
        timeout = self._settings.write_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await protocol.drain()
        except TimeoutError:
            raise WriteTimeout(f"the upstream took no request bytes for {timeout:g} s") from None

    def _pooled(self, key: Key) -> UpstreamProtocol | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            until, protocol = idle.pop()
            self._idle_count -= 1
            usable = until > now and protocol.is_connected() and not protocol.should_close
            if usable and not protocol.readable():
                return protocol
            protocol.close()
        return None

    async def _connect(self, key: Key, vet: AddressCheck | None) -> UpstreamProtocol:
        """Open a connection to an allow-listed upstream: resolve (checked again), then try each address
        (that `vet` passes, when given)."""
        scheme, host, port, _ = key
        self._guard.require(host, port)
        loop = asyncio.get_running_loop()
        timeout = self._settings.connect_timeout_s
        tls = self._tls if scheme == "https" else None
        try:
            async with asyncio.timeout(timeout):
                answers = await self._resolver.resolve(host, port, socket.AF_UNSPEC)
        except TimeoutError:
            raise NameNotResolved(f"{host}: no answer in {timeout:g} s") from None
        except OSError as exc:
            raise NameNotResolved(f"{host}: {exc}") from None
        last: BaseException = OSError(f"{host} has no address")
        for answer in answers:
            address = answer["host"]
            refused = vet(host, address) if vet is not None else None
            if refused is not None:
                last = GatewayFailure(refused)
                continue
            try:
                async with asyncio.timeout(timeout):
                    _, protocol = await loop.create_connection(
                        lambda: UpstreamProtocol(loop),
                        address,
                        port,
                        ssl=tls,
                        server_hostname=host if tls else None,
                    )
                return protocol
            except TimeoutError:
                last = ConnectTimeout(f"connecting to {address}:{port}: no answer in {timeout:g} s")
            except ssl.SSLError:
                raise
            except OSError as exc:
                last = type(exc)(exc.errno, f"connecting to {address}:{port}: {exc.strerror or exc}")
        raise last

    def release(self, key: Key, protocol: UpstreamProtocol, *, ended: bool, keep_s: float) -> None:
        """A response is done: keep its connection for the next request only if the exchange ended exactly."""
        protocol.in_flight = False
        if (
            not ended
            or not protocol.sent
            or keep_s <= 0
            or self._closed
            or protocol.should_close
            or not protocol.is_connected()
            or self._idle_count >= self._settings.max_idle
            or not protocol.parser_at_boundary()
        ):
            protocol.close()
            return
        self._idle.setdefault(key, []).append((time.monotonic() + keep_s, protocol))
        self._idle_count += 1

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for _, protocol in idle:
                protocol.close()
        self._idle.clear()
        self._idle_count = 0


def keep_alive_s(value: str) -> float:
    """How long to keep a connection whose upstream said `Keep-Alive: timeout=N`: well before it closes it.

    Reusing a connection in the last moments of its timeout races the upstream's close; a second's margin
    (half the timeout when that is shorter) leaves the close to us.
    """
    for param in value.split(","):
        name, _, number = param.partition("=")
        if name.strip().lower() == "timeout":
            try:
                timeout = float(number)
            except ValueError:
                break
            if not math.isfinite(timeout) or timeout <= 0:
                break
            return min(IDLE_S, max(timeout - 1, timeout / 2))
    return IDLE_S


async def _final_head(
    protocol: UpstreamProtocol, message: RawResponseMessage, content: StreamReader
) -> tuple[RawResponseMessage, StreamReader]:
    """Past the interim answers (1xx, which are not relayed) to the final response head."""
    while 100 <= message.code < 200 and message.code != 101:
        if protocol.sent:
            protocol.start_timeout()  # aiohttp drops the read timer at each interim answer
        message, content = await protocol.read()
    return message, content


async def _stop(task: asyncio.Task[None]) -> None:
    if not task.done():
        task.cancel()
        await asyncio.wait((task,))


def _head(method: str, url: URL, headers: Iterable[tuple[str, str]]) -> bytes:
    """The request line and header block as bytes, in one piece (one write, one packet)."""
    lines = "\r\n".join((f"{method} {url.raw_path_qs or '/'} HTTP/1.1", *map(": ".join, headers)))
    return (lines + "\r\n\r\n").encode("utf-8", "surrogateescape")
