"""The terminal step: stream the request to the upstream and the response back, both ways, bounded.

Bodies are never buffered whole: the request streams through a size-counting generator, and the response
is written to the client chunk by chunk as it arrives (so SSE and chunked responses flush at once).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from gateway.errors import Code, GatewayError, GatewayFailure
from gateway.headers import downstream_response_headers, upstream_request_headers
from gateway.pipeline import Exchange, Target
from gateway.upstream import client_error

CHUNK = 2**16


class UploadState:
    """What the request-body generator saw; read after a failure to tell a 413 from an upstream fault."""

    __slots__ = ("too_large",)

    def __init__(self) -> None:
        self.too_large = False


async def _request_body(
    request: web.BaseRequest, exchange: Exchange, limit: int, state: UploadState
) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(CHUNK):
        exchange.bytes_in += len(chunk)
        if exchange.bytes_in > limit:
            state.too_large = True
            raise GatewayFailure(GatewayError(Code.BODY_TOO_LARGE, "request body is over the limit"))
        yield chunk


async def forward(
    request: web.BaseRequest,
    exchange: Exchange,
    target: Target,
    session: aiohttp.ClientSession,
    *,
    max_body: int,
    proxy: str | None,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> web.StreamResponse:
    """Send the request upstream and stream the answer back; raise GatewayFailure before any byte is sent."""
    headers = upstream_request_headers(
        request.headers,
        host_header=target.route.host_header,
        client_ip=exchange.client_ip,
        client_host=request.headers.get("Host"),
        scheme=request.scheme,
        request_id=exchange.request_id,
    )
    state = UploadState()
    body = _request_body(request, exchange, max_body, state) if request.body_exists else None
    try:
        upstream = await session.request(
            request.method,
            target.url,
            headers=headers,
            data=body,
            allow_redirects=False,
            proxy=proxy,
        )
    except Exception as exc:
        if state.too_large:
            raise GatewayFailure(GatewayError(Code.BODY_TOO_LARGE, "request body is over the limit")) from exc
        raise
    try:
        return await _relay(request, exchange, upstream, extra_headers)
    finally:
        upstream.close()


async def _relay(
    request: web.BaseRequest,
    exchange: Exchange,
    upstream: aiohttp.ClientResponse,
    extra_headers: tuple[tuple[str, str], ...],
) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(downstream_response_headers(upstream.headers, exchange.request_id))
    response.headers.extend(extra_headers)  # ours appended; upstream's own RateLimit fields are kept
    exchange.status = upstream.status
    await response.prepare(request)
    content = upstream.content
    while True:
        try:
            chunk = await content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are gone already: the only honest signal left is to cut the connection short.
            exchange.decisions.append("forward:aborted_midstream")
            exchange.error = client_error(exc)
            if request.transport is not None:
                request.transport.close()
            return response
        if not chunk:
            break
        exchange.bytes_out += len(chunk)
        try:
            await response.write(chunk)
        except ConnectionError:
            exchange.decisions.append("client:disconnected")
            return response  # aiohttp sees the dead transport and finishes quietly
    await response.write_eof()
    return response
