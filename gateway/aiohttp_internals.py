"""Every use of aiohttp's private API, in one place, and a start-up check that each still exists.

A proxy needs a few things aiohttp keeps to itself: the server protocol's parse state (to bound the time
to a head), the client protocol's parser and back-pressure (the lean upstream client), a response's header
hook, a site's server, the connector's connect step, and the texts of parser errors. Other modules use the
names given here, never an underscore of aiohttp's; `check()` runs before the gateway serves, so an aiohttp
that renamed one of them stops the start with one line naming its version, not the first request with a
traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, InvalidURLError, LineTooLong
from aiohttp.http_parser import HttpRequestParser
from aiohttp.tracing import Trace
from aiohttp.web_protocol import RequestHandler

PINNED = "aiohttp>=3.14.5,<3.15"  # as in pyproject.toml; said when a check fails


class AiohttpMismatch(RuntimeError):
    """The installed aiohttp lacks something the gateway relies on; the message names it and the version."""


class ServerProtocol(RequestHandler):
    """aiohttp's server protocol, with the parse state the gateway reads under names of its own."""

    @property
    def server(self) -> Any:
        """The `web.Server` that built this protocol (None once the connection is gone)."""
        return self._manager

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def head_in(self, data: bytes) -> bool:
        """aiohttp's `data_received`; True when a whole request head (or a parse error) came of it."""
        before = self._request_count
        RequestHandler.data_received(self, data)
        return self._request_count != before

    @property
    def between_requests(self) -> bool:
        """No request is being handled and none is queued: the next bytes start a new head."""
        return self._current_request is None and not self._messages

    @property
    def tunnel_requested(self) -> bool:
        """The parser took the last request for a CONNECT (or Upgrade): what follows is not HTTP."""
        return self._upgraded

    def divert(self, parser: Any) -> None:
        """Hand every byte after the current request to `parser` (how aiohttp's WebSocket takes over)."""
        self.set_parser(parser)


class ProtocolFactory(web.Server):
    """aiohttp's `web.Server`, building protocols of a class of the gateway's own."""

    def build(self, cls: type[ServerProtocol], **settings: Any) -> ServerProtocol:
        """A protocol with the server's settings, `settings` overriding them (e.g. after a reload)."""
        return cls(self, loop=self._loop, **{**self._kwargs, **settings})


class ClientProtocol(ResponseHandler):
    """aiohttp's client protocol (its C response parser, read timeout and flow control), driven directly.

    Its read timeout is kept lazily: aiohttp cancels its timer and starts a new one at every read; here
    a read only moves the deadline, and the one timer, when it fires early, waits out the rest (as nginx
    keeps its timers).
    """

    _read_deadline: float | None = None

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._drop_timeout()
            return
        loop = self._loop
        self._read_deadline = deadline = loop.time() + timeout
        if self._read_timeout_handle is None:
            self._read_timeout_handle = loop.call_at(deadline, self._read_timer)

    def _drop_timeout(self) -> None:
        self._read_deadline = None  # a timer still running finds nothing to time out
        if self.transport is None:  # closed: no timer keeps the protocol alive
            self._cancel_read_timer()

    def _read_timer(self) -> None:
        self._read_timeout_handle = None
        deadline = self._read_deadline
        if deadline is None:
            return
        if self._loop.time() < deadline:  # bytes came since it was set: wait out the rest
            self._read_timeout_handle = self._loop.call_at(deadline, self._read_timer)
            return
        self._read_deadline = None
        self._on_read_timeout()

    def _cancel_read_timer(self) -> None:
        handle, self._read_timeout_handle = self._read_timeout_handle, None
        if handle is not None:
            handle.cancel()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._cancel_read_timer()

    def use_parser(self, head_only: bool, params: dict[str, Any] | None = None) -> None:
        """A new response parser (with `params`), unless the current one already frames responses this
        way."""
        if self._parser is None or self._skip_payload is not head_only:
            self.set_response_params(skip_payload=head_only, **(params or {}))

    def parser_at_boundary(self) -> bool:
        """Whether the parser holds no byte of a next message (a partial head is invisible elsewhere)."""
        parser = self._parser
        if parser is None:
            return False
        try:
            return parser.feed_eof() is None
        except Exception:  # bytes of a message that never ended
            return False

    async def drain(self) -> None:
        await self._drain_helper()


class RelayedResponse(web.StreamResponse):
    """A response streamed from upstream: aiohttp adds no `Server` or `Content-Type` of its own."""

    async def _prepare_headers(self) -> None:
        headers = self.headers
        server, content_type = "Server" in headers, "Content-Type" in headers
        await super()._prepare_headers()
        if not server:
            headers.popall("Server", None)
        if not content_type:
            headers.popall("Content-Type", None)


def defer_head(response: web.StreamResponse) -> None:
    """Hold the response head until the first body bytes, so both leave in one write."""
    response._send_headers_immediately = False


class CheckedConnector(aiohttp.TCPConnector):
    """aiohttp's connector, asking `admit` about the final URL at the moment each connection is made."""

    def admit(self, host: str | None, port: int) -> None:
        """Raise to refuse the connection; the default admits all."""

    async def _create_connection(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's own signature
    ) -> ResponseHandler:
        self.admit(req.url.raw_host, req.url.port or 0)
        return await super()._create_connection(req, traces, timeout)


def bound_port(site: web.TCPSite) -> int:
    """The port a started site listens on (the one the kernel picked when asked for 0)."""
    server: Any = site._server
    return int(server.sockets[0].getsockname()[1])


class TlsSite(web.TCPSite):
    """aiohttp's TCP site, passing asyncio a bound on each TLS handshake (aiohttp passes none)."""

    __slots__ = ("_handshake_timeout_s",)

    def __init__(self, *args: Any, handshake_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handshake_timeout_s = handshake_timeout_s

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner, as TCPSite.start does first
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._handshake_timeout_s,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )


# Parser errors carry what was refused only in their texts.
def too_many_headers(exc: BaseException) -> bool:
    return isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)
    )


def refused_method(exc: BaseException) -> str | None:
    """The method of a request line llhttp refused: its message quotes the line (`b'TRACK /x HTTP/1.1'`)."""
    if not isinstance(exc, BadHttpMethod):
        return None
    _, _, line = exc.message.partition("b'")
    return line.partition(" ")[0]


def refused_connect_target(exc: BaseException) -> bool:
    """Whether the rejected target was a CONNECT's: aiohttp quotes the raw target, llhttp the request line."""
    if not isinstance(exc, InvalidURLError):
        return False
    target = exc.message
    if "\n" in target:  # llhttp: "Unexpected char in url server:\n\n  b'CONNECT a:\\xc2 HTTP/1.1'..."
        return "b'CONNECT " in target
    return not target.startswith(("/", "*")) and "://" not in target


# What the classes above reach into, by owner: slots and methods are looked up on the class, plain
# attributes (set in `__init__`) on an instance.
_CLASS_NEEDS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (
        RequestHandler,
        ("_manager", "_loop", "_request_count", "_current_request", "_messages", "_upgraded", "set_parser"),
    ),
    (
        ResponseHandler,
        ("_parser", "_drain_helper", "set_response_params", "writing_paused", "start_timeout", "read"),
    ),
    (ResponseHandler, ("should_close", "is_connected", "set_exception", "close")),
    (ResponseHandler, ("_reschedule_timeout", "_drop_timeout", "_on_read_timeout")),
    (web.StreamResponse, ("_prepare_headers", "_send_headers_immediately")),
    (aiohttp.TCPConnector, ("_create_connection",)),
    (web.TCPSite, ("_server", "_runner", "_host", "_port", "_ssl_context", "_backlog")),
    (web.TCPSite, ("_reuse_address", "_reuse_port")),
)
_INSTANCE_NEEDS: tuple[tuple[str, Callable[[asyncio.AbstractEventLoop], object], tuple[str, ...]], ...] = (
    (
        "ResponseHandler()",
        ResponseHandler,
        ("_skip_payload", "_read_timeout", "_read_timeout_handle", "_loop"),
    ),
    ("Server()", lambda loop: web.Server(_no_handler, loop=loop), ("_loop", "_kwargs")),
)


async def _no_handler(request: web.BaseRequest) -> web.StreamResponse:
    raise AssertionError("never called: built only to be looked at")


def check() -> None:
    """Raise AiohttpMismatch unless every private name above exists and parser errors read as expected."""
    missing = [
        f"{owner.__name__}.{name}"
        for owner, names in _CLASS_NEEDS
        for name in names
        if not hasattr(owner, name)
    ]
    loop = asyncio.new_event_loop()
    try:
        for label, build, names in _INSTANCE_NEEDS:
            probe = build(loop)
            missing += [f"{label}.{name}" for name in names if not hasattr(probe, name)]
        if not missing:
            missing += _parser_texts(loop) + _boundary_probe(loop)
    finally:
        loop.close()
    if missing:
        raise AiohttpMismatch(
            f"aiohttp {aiohttp.__version__} lacks what bt-gateway uses ({', '.join(missing)}); "
            f"install {PINNED}"
        )


def _boundary_probe(loop: asyncio.AbstractEventLoop) -> list[str]:
    """`parser_at_boundary` must see the start of a next message that the parser holds (the pure-Python
    parser, AIOHTTP_NO_EXTENSIONS, does not keep one the same way)."""
    probe = ClientProtocol(loop)
    probe.use_parser(False)
    parser = probe._parser
    assert parser is not None
    parser.feed_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    clean = probe.parser_at_boundary()
    probe.use_parser(True)  # a new parser (the framing changed), fed a message and part of another
    parser = probe._parser
    assert parser is not None
    parser.feed_data(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Le")
    if clean and not probe.parser_at_boundary():
        return []
    return ["the response parser's end-of-message state (is aiohttp's C parser in use?)"]


def _parser_texts(loop: asyncio.AbstractEventLoop) -> list[str]:
    """Feed aiohttp's request parser the refusals whose texts are read above; name any read wrong."""
    cases = (
        (b"TRACK / HTTP/1.1\r\n\r\n", lambda exc: refused_method(exc) == "TRACK", "method in BadHttpMethod"),
        (b"CONNECT a:\xc2 HTTP/1.1\r\n\r\n", refused_connect_target, "CONNECT target in InvalidURLError"),
        (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 130 + b"\r\n", too_many_headers, "'Too many headers'"),
    )
    wrong = []
    for data, reads, what in cases:
        parser = HttpRequestParser(
            RequestHandler.__new__(RequestHandler), loop, 2**16, max_headers=128, max_field_size=8190
        )
        try:
            parser.feed_data(data)
        except Exception as exc:  # the refusal under test
            if reads(exc):
                continue
        wrong.append(f"parser error text: {what}")
    return wrong
