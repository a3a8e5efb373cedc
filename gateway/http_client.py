"""The lean upstream client: pooled HTTP/1.1 keep-alive connections, one write per request head.

aiohttp's `ClientSession` builds a `ClientRequest` per call (auto headers, cookies, redirects, proxy and
trace hooks) that a proxy never uses; here a request head is serialized once into bytes and written with
one call, and the response is parsed by aiohttp's own C parser (its `ResponseHandler` protocol, with the
read timeout and flow control that come with it). The allow-list is checked where each connection is
opened, and names resolve through the gateway's resolver (which checks it again). The corporate-proxy case
(`upstream.proxy`) keeps aiohttp's session, which knows how to chain through it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from aiohttp.client_proto import ResponseHandler
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy
from yarl import URL

from gateway.upstream import ConnectTimeout, EgressGuard, EgressResolver, NameNotResolved

IDLE_S = 15.0  # a pooled connection unused this long is closed rather than reused
CHUNK_END = b"0\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ClientSettings:
    connect_timeout_s: float
    read_timeout_s: float
    max_line_size: int
    max_field_size: int
    max_idle: int  # pooled idle connections kept, over all upstreams


class UpstreamResponse:
    """A response head and its streaming body; `close()` returns a drained connection to the pool."""

    __slots__ = ("_client", "_key", "_message", "_protocol", "content")

    def __init__(
        self,
        client: HttpClient,
        key: tuple[str, str, int],
        protocol: ResponseHandler,
        message: RawResponseMessage,
        content: StreamReader,
    ) -> None:
        self._client = client
        self._key = key
        self._protocol: ResponseHandler | None = protocol
        self._message = message
        self.content = content

    @property
    def status(self) -> int:
        return self._message.code

    @property
    def reason(self) -> str:
        return self._message.reason

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._message.headers

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return self._message.raw_headers

    @property
    def content_length(self) -> int | None:
        value = self._message.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            self._client.release(self._key, protocol, reusable=self.content.is_eof())


class HttpClient:
    """Pooled HTTP/1.1 to the allow-listed upstreams of one generation."""

    def __init__(
        self, guard: EgressGuard, resolver: EgressResolver, tls: ssl.SSLContext, settings: ClientSettings
    ) -> None:
        self._guard = guard
        self._resolver = resolver
        self._tls = tls
        self._settings = settings
        self._idle: dict[tuple[str, str, int], list[tuple[float, ResponseHandler]]] = {}
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
    ) -> UpstreamResponse:
        """Send one request (head in one write, body streamed) and wait for the response head."""
        assert url.raw_host is not None and url.port is not None
        key = (url.scheme, url.raw_host, url.port)
        protocol = self._pooled(key)
        if protocol is None:  # (not `or`: an idle protocol is an empty queue, and so falsy)
            protocol = await self._connect(key)
        head_only = method == "HEAD"
        if protocol._skip_payload is not head_only or protocol._parser is None:
            self._set_parser(protocol, head_only)  # else the parser waits at a message boundary: reuse
        try:
            await self._write(protocol, _head(method, url, headers), body, chunked=chunked)
            protocol.start_timeout()
            message, content = await protocol.read()
            while 100 <= message.code < 200 and message.code != 101:  # interim answers are not relayed
                message, content = await protocol.read()
        except BaseException:
            protocol.close()
            raise
        return UpstreamResponse(self, key, protocol, message, content)

    def _set_parser(self, protocol: ResponseHandler, head_only: bool) -> None:
        """A new response parser: once per connection, and again only when a HEAD changes the framing."""
        settings = self._settings
        protocol.set_response_params(
            skip_payload=head_only,
            auto_decompress=False,
            read_timeout=settings.read_timeout_s,
            read_bufsize=2**16,
            max_line_size=settings.max_line_size,
            max_field_size=settings.max_field_size,
            max_headers=256,
        )

    def _pooled(self, key: tuple[str, str, int]) -> ResponseHandler | None:
        idle = self._idle.get(key)
        cutoff = time.monotonic() - IDLE_S
        while idle:
            since, protocol = idle.pop()
            self._idle_count -= 1
            if since > cutoff and protocol.is_connected() and not protocol.should_close:
                return protocol
            protocol.close()
        return None

    async def _connect(self, key: tuple[str, str, int]) -> ResponseHandler:
        """Open a connection to an allow-listed upstream: resolve (checked again), then try each address."""
        scheme, host, port = key
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
            try:
                async with asyncio.timeout(timeout):
                    _, protocol = await loop.create_connection(
                        lambda: ResponseHandler(loop),
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

    @staticmethod
    async def _write(
        protocol: ResponseHandler, head: bytes, body: AsyncIterator[bytes] | None, *, chunked: bool
    ) -> None:
        transport = protocol.transport
        assert transport is not None
        if body is None:
            transport.write(head)
            return
        pending = head
        async for chunk in body:
            data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
            transport.write(pending + data if pending else data)
            pending = b""
            await protocol._drain_helper()  # back-pressure from the upstream
        transport.write(pending + CHUNK_END if chunked else pending)

    def release(self, key: tuple[str, str, int], protocol: ResponseHandler, *, reusable: bool) -> None:
        """A response is done: keep its connection for the next request, or close it."""
        if (
            not reusable
            or self._closed
            or protocol.should_close
            or not protocol.is_connected()
            or self._idle_count >= self._settings.max_idle
        ):
            protocol.close()
            return
        self._idle.setdefault(key, []).append((time.monotonic(), protocol))
        self._idle_count += 1

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for _, protocol in idle:
                protocol.close()
        self._idle.clear()
        self._idle_count = 0


def _head(method: str, url: URL, headers: Iterable[tuple[str, str]]) -> bytes:
    """The request line and header block as bytes, in one piece (one write, one packet)."""
    lines = "\r\n".join((f"{method} {url.raw_path_qs or '/'} HTTP/1.1", *map(": ".join, headers)))
    return (lines + "\r\n\r\n").encode("utf-8", "surrogateescape")
