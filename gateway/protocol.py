"""The client side of each connection: aiohttp's HTTP protocol with the gateway's own bounds on clients.

aiohttp bounds neither how long a request head may take to arrive (slowloris) nor how many connections
may be open; here a head must be complete within `limits.header_timeout_s` (else 408 and close) and
beyond `limits.max_client_connections` a new connection is answered 503 and closed at once, leaving the
others unharmed. Parser failures are answered as JSON errors like every other refusal.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.aiohttp_internals import ProtocolFactory, ServerProtocol
from gateway.errors import Code, GatewayError
from gateway.exchange import request_id
from gateway.logs import get_logger
from gateway.responses import error_response, parse_error, raw_error

log = get_logger("gateway.protocol")
HEAD_TIMEOUT = GatewayError(Code.REQUEST_TIMEOUT, "the request head did not arrive in time")
TOO_MANY = GatewayError(Code.TOO_MANY_CONNECTIONS, "the gateway has too many open connections")


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """Taken by each new connection; a reload replaces them whole, so they apply to connections it opens."""

    head_timeout_s: float
    max_connections: int
    keepalive_timeout_s: float
    max_head_bytes: int  # one request line or header field (`limits.max_header_kb`)


class GatewayProtocol(ServerProtocol):
    """aiohttp's per-connection protocol, bounded in time to a complete head and in number."""

    client_eof = False  # the client half-closed while a CONNECT was pending
    _head_deadline: asyncio.TimerHandle | None = None
    _counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server: GatewayServer = self.server
        if server.open_connections >= server.limits.max_connections:
            self._refuse(TOO_MANY)
            return
        server.open_connections += 1
        self._counted = True
        self._arm()  # the first head is due from the moment the connection opens

    def connection_lost(self, exc: BaseException | None) -> None:
        server: GatewayServer | None = self.server
        self._disarm()
        if self._counted and server is not None:
            server.open_connections -= 1
            self._counted = False
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.head_in(data):
            self._disarm()  # a whole head arrived (or a parse error, answered by the handler)
        elif self._head_deadline is None and self.between_requests:
            self._arm()  # the first bytes of the next request on a kept-alive connection

    def eof_received(self) -> bool | None:  # type: ignore[override]
        """Keep a CONNECT's transport open on the client's FIN: the tunnel passes the FIN on.

        Over TLS there is no half-close (the SSL transport closes whatever this returns, and warns when
        asked to keep it open), so there the end of the client's stream ends the connection.
        """
        if self.tunnel_requested:
            self.client_eof = True
            transport = self.transport
            return transport is None or transport.get_extra_info("sslcontext") is None
        return None

    def _arm(self) -> None:
        server: GatewayServer = self.server
        self._head_deadline = self.loop.call_later(server.limits.head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.between_requests:
            self._refuse(HEAD_TIMEOUT)

    def _refuse(self, error: GatewayError) -> None:
        """Answer without a request (no handler runs), then close."""
        rid = request_id(None)
        log.warning("request_rejected", code=str(error.code), status=error.status, request_id=rid)
        if self.transport is not None:
            self.transport.write(raw_error(error, rid))
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        rid = request_id(None)
        if status == 400:
            error = parse_error(exc)
            log.warning("request_rejected", code=str(error.code), status=error.status, request_id=rid)
        else:  # a bug of ours: keep the traceback (scrubbed by the log processors), answer 500
            error = GatewayError(Code.INTERNAL, "internal error")
            log.error("unhandled_error", request_id=rid, exc_info=exc)
        return error_response(error, rid, close=True)


class GatewayServer(ProtocolFactory):
    """Builds `GatewayProtocol`s and holds what they share: the limits and the open-connection count."""

    def __init__(self, *args: Any, limits: ClientLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.open_connections = 0

    def __call__(self) -> GatewayProtocol:
        limits = self.limits
        protocol = self.build(
            GatewayProtocol,
            keepalive_timeout=limits.keepalive_timeout_s,
            max_line_size=limits.max_head_bytes,
            max_field_size=limits.max_head_bytes,
        )
        return protocol  # type: ignore[return-value]
