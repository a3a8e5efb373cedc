"""The terminal step: stream the request to the upstream and the response back, both ways, bounded.

Bodies are never buffered whole: the request streams through a size- and time-bounded generator, and the
response is written to the client chunk by chunk as it arrives (so SSE and chunked responses flush at once).
A response head that is not valid HTTP is never relayed.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from gateway import direct_response
from gateway.aiohttp_internals import RelayedResponse, defer_head
from gateway.audit import Audit
from gateway.errors import Code, GatewayError, GatewayFailure, Reason
from gateway.exchange import CLIENT_GONE, FORWARD_PROXY_ROUTE, Exchange
from gateway.headers import (
    Fields,
    downstream_response_headers,
    relay_request_headers,
    upstream_request_headers,
)
from gateway.http_client import AddressCheck, HttpClient, UpstreamResponse
from gateway.logs import get_logger
from gateway.policy.urlrewrite import REWRITE_HEADERS, RewriteAbandoned
from gateway.pool import UpstreamPool
from gateway.response_rewrite import BodyTransform, ResponseRewrite
from gateway.upstream import client_error

CHUNK = 2**16
# A rewritable body that arrives whole with its head and is at most this long is rewritten in one go and
# sent with a Content-Length; longer ones stream (chunked), yielding to the loop between pieces.
WHOLE_REWRITE = 2**14
BODY_TOO_LARGE = GatewayError(Code.BODY_TOO_LARGE, "request body is over the limit")
BODY_TIMEOUT = GatewayError(Code.REQUEST_TIMEOUT, "the request body stopped arriving")
# RFC 9110: a field-name is a token; a value holds visible bytes, spaces and tabs (no CR, LF, NUL)
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# A reason phrase (decoded): no control character but tab, no surrogate (a byte that was not UTF-8)
_REFUSED_IN_REASON = re.compile("[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
log = get_logger("gateway.forward")
Upstream = aiohttp.ClientResponse | UpstreamResponse


class UploadState:
    """What the request-body generator saw; read after a failure to tell whose fault it was."""

    __slots__ = ("client_error",)

    def __init__(self) -> None:
        self.client_error: GatewayError | None = None  # 413, 408, or the client leaving mid-upload


async def _request_body(
    request: web.BaseRequest, exchange: Exchange, limit: int, timeout_s: float, state: UploadState
) -> AsyncIterator[bytes]:
    content = request.content
    while True:
        try:
            async with asyncio.timeout(timeout_s):
                chunk = await content.readany()
        except TimeoutError:
            state.client_error = BODY_TIMEOUT
            raise
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


def _has_length(headers: Fields) -> bool:
    """Whether the request as sent upstream declares its body's length (else it goes chunked)."""
    return any(name.lower() == "content-length" for name, _ in headers)


def _upstream_fault(what: str, reason: Reason, host: str, cause: str) -> GatewayError:
    """502 `upstream_bad_response`: the upstream sent something the gateway will not relay."""
    return GatewayError(
        Code.UPSTREAM_BAD_RESPONSE,
        f"upstream {what}: {host}",
        reason=reason,
        context=(("upstream", host), ("cause", cause)),
    )


def invalid_head(status: int, reason: str | None, raw_headers: tuple[tuple[bytes, bytes], ...]) -> str | None:
    """Why an upstream response head must not be relayed, or None when it is valid HTTP.

    No upgrade is ever asked for (Upgrade is hop-by-hop), so 1xx cannot be a final answer; field names
    must be tokens (`Content-Length : 2` is not) and values, like the reason phrase (as the parser
    decoded it, UTF-8 with surrogateescape), valid UTF-8 without control bytes.
    """
    if not 200 <= status <= 599:
        return f"status {status}"
    if reason is not None and not reason.isprintable() and _REFUSED_IN_REASON.search(reason):
        return "control bytes or bytes that are not UTF-8 in the reason phrase"
    if not raw_headers:
        return None
    # The usual head, in a few C calls rather than three per field: names of letters, digits and hyphens,
    # none empty; values printable once decoded (no control byte, no line feed, no byte that is not
    # UTF-8: those decode to unprintable surrogates), joined by a space so that no character is made of
    # the end of one value and the start of the next. Anything else (other token characters, tabs) goes
    # the long way, which names the field when something is wrong.
    names, values = zip(*raw_headers)  # noqa: B905 - name-value pairs; strict= costs a keyword parse
    if (
        all(names)
        and b"".join(names).replace(b"-", b"").isalnum()
        and b" ".join(values).decode("utf-8", "surrogateescape").isprintable()
    ):
        return None
    for name, value in raw_headers:
        if not _NAME.fullmatch(name):
            return f"header name {name[:64]!r}"
        if not _VALUE.fullmatch(value):
            return f"control bytes in header {name[:64].decode('latin-1')}"
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return f"header {name[:64].decode('latin-1')} is not valid UTF-8"
    return None


@dataclass(frozen=True, slots=True)
class Forwarder:
    """How one generation forwards: its session and pool, and the response-side rewrite and audit."""

    session: aiohttp.ClientSession
    client: HttpClient | None  # the lean client; None when upstream.proxy needs aiohttp's session
    pool: UpstreamPool
    max_body: int
    body_timeout_s: float
    proxy: str | None
    rewrite: ResponseRewrite | None
    audit: Audit | None
    vet: AddressCheck | None = None  # forward-proxy requests: each resolved address (deny_private_addresses)

    async def forward(self, request: web.BaseRequest, exchange: Exchange) -> web.StreamResponse:
        """Send the request upstream and stream the answer back; raise GatewayFailure before any byte.

        Failures are the client's (413, 408, 499) when its body broke, else mapped by `client_error`.
        """
        target = exchange.target
        assert target is not None  # routed by the chain
        route = target.route
        pool, client_ip = self.pool, exchange.client_ip
        if not pool.try_acquire(client_ip):
            await pool.acquire(client_ip)
        try:
            headers = self._request_headers(request, exchange, route.host_header)
            state = body = None
            if request.body_exists:
                state = UploadState()
                body = _request_body(request, exchange, self.max_body, self.body_timeout_s, state)
            started = time.perf_counter()
            try:
                upstream: Upstream
                if self.client is not None:
                    chunked = body is not None and not _has_length(headers)
                    if chunked:
                        headers.append(("Transfer-Encoding", "chunked"))
                    vet = self.vet if exchange.route == FORWARD_PROXY_ROUTE else None
                    upstream = await self.client.request(
                        request.method, target.url, headers, body, chunked=chunked, vet=vet
                    )
                else:  # through the corporate proxy: aiohttp's session chains through it
                    upstream = await self.session.request(
                        request.method,
                        target.url,
                        headers=headers,
                        data=body,
                        allow_redirects=False,
                        proxy=self.proxy,
                    )
            except (GatewayFailure, aiohttp.ClientError, OSError, TimeoutError, HttpProcessingError) as exc:
                if state is not None and state.client_error is not None:
                    raise GatewayFailure(state.client_error) from exc
                raise GatewayFailure(client_error(exc, route.host)) from exc
            exchange.upstream_seconds = time.perf_counter() - started
            try:
                problem = invalid_head(upstream.status, upstream.reason, upstream.raw_headers)
                if problem is not None:
                    what = "sent a response that is not valid HTTP"
                    raise GatewayFailure(_upstream_fault(what, Reason.BAD_RESPONSE, route.host, problem))
                return await self._relay(request, exchange, upstream, route.host)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise GatewayFailure(client_error(exc, route.host)) from exc
            finally:
                upstream.close()
        finally:
            pool.release(client_ip)

    def _request_headers(self, request: web.BaseRequest, exchange: Exchange, host_header: str) -> Fields:
        if exchange.relay:  # to an object store: the transfer, nothing of the client's
            rid = exchange.request_id
            return relay_request_headers(request.headers, host_header=host_header, request_id=rid)
        headers = upstream_request_headers(
            request.headers,
            host_header=host_header,
            client_ip=exchange.client_ip,
            client_host=exchange.headers.get("Host"),
            scheme=exchange.scheme,
            request_id=exchange.request_id,
        )
        if self.audit is not None:  # ours replace whatever the client sent under those names
            ours = self.audit.upstream_headers()
            names = {name.lower() for name, _ in ours}
            headers = [field for field in headers if field[0].lower() not in names]
            headers += ours
        return headers

    async def _relay(
        self, request: web.BaseRequest, exchange: Exchange, upstream: Upstream, host: str
    ) -> web.StreamResponse:
        headers = CIMultiDict(downstream_response_headers(upstream.headers, exchange.request_id))
        if self.audit is not None:
            self.audit.capture(exchange, upstream.headers, headers)
        body = self._rewriter(request, exchange, upstream, headers)
        headers.extend(exchange.response_headers)  # ours appended; upstream's RateLimit kept
        exchange.status = exchange.upstream_status = upstream.status
        content, length = upstream.content, upstream.content_length
        if body is None:
            if length is not None and content.is_eof():
                # Small answers arrive whole with their head: head and body leave in one write.
                return await _whole(request, exchange, upstream, headers, content.read_nowait())
            response = _streamed(upstream, headers)
            if length is not None:
                # A body of known length: the head goes out with its first bytes, one write not two.
                defer_head(response)
            elif not await _send(request, response, exchange, b""):
                return response  # a stream (SSE, chunked): its head goes at once, clients see it
            return await _pass_through(request, response, exchange, upstream, host=host)
        if length is not None and length <= WHOLE_REWRITE and content.is_eof():
            data = content.read_nowait()
            return await _rewrite_whole(request, exchange, upstream, headers, body=body, data=data)
        return await _rewrite_through(
            request, _streamed(upstream, headers), exchange, upstream, host=host, body=body
        )

    def _rewriter(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        upstream: Upstream,
        headers: CIMultiDict[str],
    ) -> BodyTransform | None:
        """Rewrite URL headers now; if the body may change, fix its headers and return its rewriter."""
        if self.rewrite is None or exchange.relay:  # an object store's answer is relayed as it is
            return None
        body_path = self.rewrite.body_path(exchange)
        if not body_path:
            for name in REWRITE_HEADERS:  # a loop, not any(): this runs on every response
                if name in headers:
                    break
            else:
                exchange.decisions.append("rewrite:passthrough")
                return None  # most responses: nothing to rewrite, no rules to build
        external = self.rewrite.external_url(exchange)
        rules = self.rewrite.policy.rules_for(external)
        if not rules.empty:
            for name in REWRITE_HEADERS:
                values = headers.popall(name, ())
                for value in values:
                    headers.add(name, rules.rewrite_header(name, value))
        if not body_path:
            exchange.decisions.append("rewrite:passthrough")
            return None
        if request.method == "HEAD" or upstream.status in (204, 304):
            return None
        content_type = upstream.headers.get("Content-Type")
        encoding = upstream.headers.get("Content-Encoding")
        body = self.rewrite.body(exchange, rules, external, content_type, encoding, path=body_path)
        if body is None:
            exchange.decisions.append("rewrite:passthrough")
            return None
        exchange.decisions.append("rewrite:body")
        headers.popall("Content-Length", None)  # the length may change: stream chunked
        etag = headers.get("ETag")
        if etag is not None and not etag.startswith("W/"):
            headers["ETag"] = "W/" + etag  # same meaning, no longer byte-identical
        return body


async def _rewrite_whole(
    request: web.BaseRequest,
    exchange: Exchange,
    upstream: Upstream,
    headers: CIMultiDict[str],
    *,
    body: BodyTransform,
    data: bytes,
) -> web.StreamResponse:
    """A small body that arrived whole with its head: rewritten at once, sent with its length in one write.

    A malformed encoding raises GatewayFailure before any byte is sent, as on the streaming path.
    """
    try:
        out = body.whole(data)
    except RewriteAbandoned as exc:
        _skipped(exchange, exc.reason)
        _restore_framing(headers, upstream)
        return await _whole(request, exchange, upstream, headers, data)
    if body.skipped is not None:
        _skipped(exchange, body.skipped)
    headers["Content-Length"] = str(len(out))
    return await _whole(request, exchange, upstream, headers, out)


async def _rewrite_through(
    request: web.BaseRequest,
    response: web.StreamResponse,
    exchange: Exchange,
    upstream: Upstream,
    *,
    host: str,
    body: BodyTransform,
) -> web.StreamResponse:
    """Relay through the rewriter; a body that decodes past its limits passes unrewritten if it still can."""
    content = upstream.content
    held: list[bytes] = []  # raw bytes read before the first byte was sent: the fallback needs them
    try:
        while chunk := await content.readany():
            if not response.prepared:
                held.append(chunk)
            pieces = []  # a chunk's output goes out whole, so limits passed inside it can still fall back
            for index, out in enumerate(body.feed(chunk)):
                if index:
                    await asyncio.sleep(0)  # a chunk that decodes to many pieces shares the loop
                pieces.append(out)
            out = b"".join(pieces)
            if out and not await _send(request, response, exchange, out):
                return response
        if not await _send(request, response, exchange, body.finish()):
            return response
    except RewriteAbandoned as exc:
        _skipped(exchange, exc.reason)
        if not response.prepared:  # nothing sent: the original bytes go out as they came
            _restore_framing(response.headers, upstream)
            if not await _send(request, response, exchange, b""):
                return response
            return await _pass_through(request, response, exchange, upstream, host=host, held=held)
        _abort(request, exchange, _rewrite_limit(exc.reason, host))
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
    if body.skipped is not None:
        _skipped(exchange, body.skipped)
    return await _finish(request, response, exchange)


async def _pass_through(
    request: web.BaseRequest,
    response: web.StreamResponse,
    exchange: Exchange,
    upstream: Upstream,
    *,
    host: str,
    held: list[bytes] | tuple[()] = (),
) -> web.StreamResponse:
    """Relay the body byte for byte (after any bytes already read into `held`)."""
    content = upstream.content
    try:
        for chunk in held:
            if not await _send(request, response, exchange, chunk):
                return response
        while chunk := await content.readany():
            if not await _send(request, response, exchange, chunk):
                return response
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        _abort(request, exchange, client_error(exc, host))
        return response
    return await _finish(request, response, exchange)


def _streamed(upstream: Upstream, headers: CIMultiDict[str]) -> web.StreamResponse:
    """The upstream's answer as a response aiohttp frames and writes (streamed, or left to it)."""
    return RelayedResponse(status=upstream.status, reason=upstream.reason, headers=headers)


async def _whole(
    request: web.BaseRequest,
    exchange: Exchange,
    upstream: Upstream,
    headers: CIMultiDict[str],
    data: bytes,
) -> web.StreamResponse:
    """A body already read to its end: sent with the head and the end of the response, in one write."""
    try:
        head = direct_response.head_bytes(request, upstream.status, upstream.reason, headers)
        if head is not None:
            response = await direct_response.send(request, head[0], data, head[1])
        else:  # aiohttp's framing: no body by status or method, or a head line not all printable
            response = _streamed(upstream, headers)
            defer_head(response)
            await response.prepare(request)
            await response.write_eof(data)
    except ConnectionError:
        exchange.client_gone()
        return direct_response.CLOSED
    exchange.bytes_out += len(data)
    return response


async def _finish(
    request: web.BaseRequest, response: web.StreamResponse, exchange: Exchange
) -> web.StreamResponse:
    if await _send(request, response, exchange, b""):
        try:
            await response.write_eof()
        except ConnectionError:
            exchange.client_gone()
    return response


def _restore_framing(headers: CIMultiDict[str], upstream: Upstream) -> None:
    """Undo what the rewriter changed in the head: the body is the upstream's own again."""
    for name in ("Content-Length", "ETag"):
        value = upstream.headers.get(name)
        if value is not None:
            headers[name] = value


def _skipped(exchange: Exchange, reason: str) -> None:
    exchange.decisions.append(f"rewrite:skipped_{reason}")
    log.warning("rewrite_skipped", reason=reason, request_id=exchange.request_id, route=exchange.route)


def _rewrite_limit(reason: str, host: str) -> GatewayError:
    return _upstream_fault("body decodes past the rewrite limits", Reason.DECOMPRESSION_LIMIT, host, reason)


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
