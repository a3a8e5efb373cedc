"""The gateway's own responses: the one place a `GatewayError` becomes HTTP, and relayed responses.

aiohttp stamps `Server: Python/3.x aiohttp/3.x` (and a default `Content-Type`) on every response it
prepares. Responses the gateway makes itself say `Server: bt-gateway`, with no version for a scanner to
match; relayed responses (`aiohttp_internals.RelayedResponse`, and `direct_response` for those that
arrive whole) carry exactly the `Server` and `Content-Type` the upstream sent, or none.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from aiohttp import web

from gateway.aiohttp_internals import refused_connect_target, refused_method, too_many_headers
from gateway.errors import Code, GatewayError

SERVER = "bt-gateway"


def redirect_response(location: str, request_id: str) -> web.Response:
    return web.Response(
        status=302, headers={"Location": location, "X-Request-Id": request_id, "Server": SERVER}
    )


def error_response(error: GatewayError, request_id: str, *, close: bool = False) -> web.Response:
    """`{"error": {"code", "message", "request_id"}}` with the code's status and the error's own headers."""
    body = {"error": {"code": str(error.code), "message": error.detail, "request_id": request_id}}
    response = web.Response(
        status=error.status,
        reason=error.phrase,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={"X-Request-Id": request_id, "Server": SERVER, **dict(error.headers)},
    )
    if close:
        response.force_close()
    return response


def raw_error(error: GatewayError, request_id: str) -> bytes:
    """The same JSON error as bytes on the wire, for refusals made before any request exists."""
    body = json.dumps({"error": {"code": str(error.code), "message": error.detail, "request_id": request_id}})
    reason = HTTPStatus(error.status).phrase
    head = (
        f"HTTP/1.1 {error.status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nServer: {SERVER}\r\n"
        f"X-Request-Id: {request_id}\r\n\r\n"
    )
    return head.encode("latin-1") + body.encode()


def parse_error(exc: BaseException | None) -> GatewayError:
    """What a request the HTTP parser rejected deserves: 431 for oversized headers, else 400."""
    if exc is None:
        return GatewayError(Code.BAD_REQUEST, "malformed HTTP request")
    if too_many_headers(exc):
        return GatewayError(Code.HEADERS_TOO_LARGE, "request header fields are too large")
    if refused_method(exc) in ("TRACE", "TRACK"):
        return GatewayError(Code.METHOD_NOT_ALLOWED, "TRACE and TRACK are not allowed")
    if refused_connect_target(exc):
        return GatewayError(Code.BAD_CONNECT_TARGET, "CONNECT target is not host:port")
    return GatewayError(Code.BAD_REQUEST, "malformed HTTP request")
