"""The terminal step: stream the request to the upstream and the response back, both ways, bounded.

Bodies are never buffered whole: the request streams through a size-counting generator, and the response
is written to the client chunk by chunk as it arrives (so SSE and chunked responses flush at once).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.audit import Audit
from gateway.errors import Code, GatewayError, GatewayFailure
from gateway.exchange import CLIENT_GONE, Exchange
from gateway.headers import downstream_response_headers, upstream_request_headers
from gateway.policy.urlrewrite import REWRITE_HEADERS, BodyRewriter, RewritePolicy, RuleSet
from gateway.responses import RelayedResponse
from gateway.upstream import client_error

CHUNK = 2**16


BODY_TOO_LARGE = GatewayError(Code.BODY_TOO_LARGE, "request body is over the limit")


class UploadState:
    """What the request-body generator saw; read after a failure to tell whose fault it was."""

    __slots__ = ("client_error",)

    def __init__(self) -> None:
        self.client_error: GatewayError | None = None  # 413, or the client leaving mid-upload


async def _request_body(
    request: web.BaseRequest, exchange: Exchange, limit: int, state: UploadState
) -> AsyncIterator[bytes]:
    content = request.content
    while True:
        try:
            chunk = await content.readany()
        except Exception:  # the client's side broke (reset, or a body shorter than it declared)
            state.client_error = CLIENT_GONE
            raise
        if not chunk:
            return
        exchange.bytes_in += len(chunk)
        if exchange.bytes_in > limit:
            state.client_error = BODY_TOO_LARGE
            raise GatewayFailure(BODY_TOO_LARGE)
        yield chunk


async def forward(
    request: web.BaseRequest,
    exchange: Exchange,
    session: aiohttp.ClientSession,
    *,
    max_body: int,
    proxy: str | None,
    rules: RuleSet | None = None,
    audit: Audit | None = None,
) -> web.StreamResponse:
    """Send the request upstream and stream the answer back; raise GatewayFailure before any byte is sent.

    Failures are the client's (413, 499) when its body broke, else mapped by `client_error`.
    """
    target = exchange.target
    assert target is not None  # routed by the chain
    headers = upstream_request_headers(
        request.headers,
        host_header=target.route.host_header,
        client_ip=exchange.client_ip,
        client_host=request.headers.get("Host"),
        scheme=request.scheme,
        request_id=exchange.request_id,
    )
    if audit is not None:
        for name, value in audit.upstream_headers():
            headers[name] = value
    state = UploadState()
    body = _request_body(request, exchange, max_body, state) if request.body_exists else None
    started = time.perf_counter()
    try:
        upstream = await session.request(
            request.method,
            target.url,
            headers=headers,
            data=body,
            allow_redirects=False,
            proxy=proxy,
        )
    except (GatewayFailure, aiohttp.ClientError, OSError, TimeoutError) as exc:
        if state.client_error is not None:
            raise GatewayFailure(state.client_error) from exc
        raise GatewayFailure(client_error(exc, target.route.host)) from exc
    exchange.upstream_seconds = time.perf_counter() - started
    try:
        return await _relay(request, exchange, upstream, rules, host=target.route.host, audit=audit)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise GatewayFailure(client_error(exc, target.route.host)) from exc
    finally:
        upstream.close()


async def _relay(
    request: web.BaseRequest,
    exchange: Exchange,
    upstream: aiohttp.ClientResponse,
    rules: RuleSet | None,
    *,
    host: str,
    audit: Audit | None,
) -> web.StreamResponse:
    response = RelayedResponse(status=upstream.status, reason=upstream.reason)
    headers = downstream_response_headers(upstream.headers, exchange.request_id)
    if audit is not None:
        audit.capture(exchange, upstream.headers, headers)
    body = _rewriter(request, upstream, headers, rules, exchange)
    response.headers.extend(headers)
    response.headers.extend(exchange.response_headers)  # ours appended; upstream's RateLimit fields kept
    exchange.status = exchange.upstream_status = upstream.status
    if body is None and not await _send(request, response, exchange, b""):
        return response  # nothing to rewrite: headers go at once (SSE clients see them)
    content = upstream.content
    try:
        while chunk := await content.readany():
            out = body.feed(chunk) if body is not None else chunk
            if out and not await _send(request, response, exchange, out):
                return response
        if body is not None and not await _send(request, response, exchange, body.finish()):
            return response
    except GatewayFailure:
        if not response.prepared:
            raise  # nothing sent yet: the client gets a proper 502 upstream_bad_encoding
        _abort(request, exchange, GatewayError(Code.UPSTREAM_BAD_ENCODING, "malformed compressed body"))
        return response
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        if not response.prepared:
            raise
        _abort(request, exchange, client_error(exc, host))
        return response
    if await _send(request, response, exchange, b""):
        try:
            await response.write_eof()
        except ConnectionError:
            exchange.client_gone()
    return response


def _rewriter(
    request: web.BaseRequest,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    rules: RuleSet | None,
    exchange: Exchange,
) -> BodyRewriter | None:
    """Rewrite URL headers now; if the body may change, fix its headers and return its rewriter."""
    if rules is None or rules.empty:
        return None
    for name in REWRITE_HEADERS:
        values = headers.popall(name, ())
        for value in values:
            headers.add(name, rules.rewrite_header(name, value))
    if request.method == "HEAD" or upstream.status in (204, 304):
        return None
    body = RewritePolicy.body(
        rules, upstream.headers.get("Content-Type"), upstream.headers.get("Content-Encoding")
    )
    if body is None:
        exchange.decisions.append("rewrite:passthrough")
        return None
    exchange.decisions.append("rewrite:body")
    headers.popall("Content-Length", None)  # the length may change: stream chunked
    etag = headers.get("ETag")
    if etag is not None and not etag.startswith("W/"):
        headers["ETag"] = "W/" + etag  # same meaning, no longer byte-identical
    return body


async def _send(
    request: web.BaseRequest, response: web.StreamResponse, exchange: Exchange, data: bytes
) -> bool:
    """Write to the client (sending headers first if still pending); False when the client went away."""
    try:
        if not response.prepared:
            await response.prepare(request)
        if data:
            await response.write(data)
    except ConnectionError:
        exchange.client_gone()
        return False  # aiohttp sees the dead transport and finishes quietly
    exchange.bytes_out += len(data)
    return True


def _abort(request: web.BaseRequest, exchange: Exchange, error: GatewayError) -> None:
    """Headers are gone already: the only honest signal left is to cut the connection short."""
    exchange.decisions.append("forward:aborted_midstream")
    exchange.error = error  # the status stays the upstream's: that is what the client was told
    if request.transport is not None:
        request.transport.close()
