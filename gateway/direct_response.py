"""A relayed response that arrived whole, written to the client in one write of our own.

Most upstream answers are small and arrive with their head; for them aiohttp's StreamResponse (prepare,
header preparation, the C serializer, the payload writer, write_eof, then prepare and write_eof again when
the handler returns) is a dozen calls per request for one `transport.write`. Here the head is joined from
the relayed fields and sent with the body; the handler returns a shared response that tells aiohttp
nothing is left to send and whether the connection stays open. The framing rules are aiohttp's where it
has any (a `Date` when the upstream sent none, `Connection` as the client's version and keep-alive need);
bodiless answers (HEAD, 204, 304) and a head with a line that is not all printable (CR, LF, the control
characters aiohttp's serializer refuses, a tab it allows, surrogates it drops) are left to aiohttp, so
nothing is sent here that aiohttp would not have sent.
"""

from __future__ import annotations

import time
from email.utils import formatdate

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

_BODILESS = frozenset({204, 304})  # aiohttp's framing rules apply (Content-Length, Transfer-Encoding)


class _Written(web.StreamResponse):
    """What the handler returns for a response already written: aiohttp's `prepare` and `write_eof` have
    nothing left to do, and `keep_alive` (a class attribute, read without a call) says whether the
    connection stays open. Stateless, so one instance of each subclass serves every request."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class _KeptOpen(_Written):
    keep_alive = True


class _Closed(_Written):
    keep_alive = False


KEPT_OPEN = _KeptOpen()
CLOSED = _Closed()


class _HttpDate:
    """The `Date` value, formatted once per second (as aiohttp and nginx cache it)."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second, self._value = second, formatdate(second, usegmt=True)
        return self._value


_DATE = _HttpDate()


def head_bytes(
    request: web.BaseRequest, status: int, reason: str | None, headers: CIMultiDict[str]
) -> tuple[bytes, bool] | None:
    """The response head for `request` and whether the connection stays open after it, or None when this
    response is one to leave to aiohttp (no body by its status or method, no reason phrase to relay, a
    line that is not all printable)."""
    if status in _BODILESS or request.method == "HEAD" or reason is None:
        return None
    version = request.version
    keep_alive = request.keep_alive
    lines = [f"HTTP/{version.major}.{version.minor} {status} {reason}"]
    lines += map(": ".join, headers.items())  # C calls only, no frame per field
    if "Date" not in headers:
        lines.append(f"Date: {_DATE.now()}")
    if "Connection" not in headers:
        if not keep_alive and version == HttpVersion11:
            lines.append("Connection: close")
        elif keep_alive and version == HttpVersion10:
            lines.append("Connection: keep-alive")
    if not "".join(lines).isprintable():  # no line would split, none holds a control or a surrogate
        return None
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), keep_alive


async def send(request: web.BaseRequest, head: bytes, body: bytes, keep_alive: bool) -> web.StreamResponse:
    """Write head and body; the response for aiohttp. ConnectionError when the client has gone.

    One `write`, never `writelines`: on some Pythons (3.12.0-3.12.8, 3.13.0-3.13.1) the latter never
    pauses the protocol, so the drain below would not wait (aiohttp avoids it there too). The writer's
    `output_size` counts the bytes, so aiohttp knows this response has started.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client has gone")
    data = head + body
    transport.write(data)
    writer = request.writer
    writer.output_size += len(data)
    if transport.get_write_buffer_size():  # the client reads slowly: wait as aiohttp's write_eof does
        await writer.drain()
    return KEPT_OPEN if keep_alive else CLOSED
