"""A relayed response that arrived whole, written to the client in one write of our own.

Most upstream answers are small and arrive with their head; for them aiohttp's StreamResponse (prepare,
header preparation, the C serializer, the payload writer, write_eof, then prepare and write_eof again when
the handler returns) is a dozen calls per request for one `transport.write`. Here the head is joined from
the relayed fields and sent with the body; the handler returns a shared response that tells aiohttp
nothing is left to send and whether the connection stays open. The framing rules are aiohttp's where it
has any (a `Date` when the upstream sent none, `Connection` as the client's version and keep-alive need);
bodiless answers (HEAD, 204, 304) and anything with CR or LF in its head are left to aiohttp.
"""

from __future__ import annotations

import time
from email.utils import formatdate

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

_BODILESS = frozenset({204, 304})  # aiohttp's framing rules apply (Content-Length, Transfer-Encoding)
_COALESCE = 2048  # below this, head and body are joined into one buffer; above, written as two (aiohttp's)


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
    response is one to leave to aiohttp (no body by its status or method, no reason phrase to relay, CR
    or LF in a line)."""
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
    head = "\r\n".join(lines)
    breaks = len(lines) - 1
    if head.count("\n") != breaks or head.count("\r") != breaks:  # a line would split: never sent
        return None
    return (head + "\r\n\r\n").encode(), keep_alive


async def send(request: web.BaseRequest, head: bytes, body: bytes, keep_alive: bool) -> web.StreamResponse:
    """Write head and body; the response for aiohttp. ConnectionError when the client has gone."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client has gone")
    if len(body) < _COALESCE:
        transport.write(head + body)
    else:
        transport.writelines((head, body))
    if transport.get_write_buffer_size():  # the client reads slowly: wait as aiohttp's write_eof does
        await request.writer.drain()
    return KEPT_OPEN if keep_alive else CLOSED
