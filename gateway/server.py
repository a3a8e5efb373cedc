"""The aiohttp wiring: one low-level server whose single handler runs the pipeline, plus the admin listener.

A low-level `web.Server` (no router) is used on purpose: every method, CONNECT included, and every
request target reaches the pipeline unaltered, and parser errors get the same JSON errors as the rest.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from gateway.config.model import GatewayConfig
from gateway.errors import Code, GatewayError, GatewayFailure
from gateway.forward import forward
from gateway.logs import get_logger
from gateway.pipeline import (
    TUNNEL_ROUTE,
    Exchange,
    Pipeline,
    Target,
    rate_limit_settings,
    request_id,
    tunnel_limit_settings,
)
from gateway.policy.credentials import FINGERPRINT_HEX, digest_of
from gateway.policy.forward_proxy import parse_connect_target
from gateway.policy.ratelimit import RateLimiter, rate_key
from gateway.responses import error_response, parse_error
from gateway.tunnel import TunnelResult, TunnelStats, connect_upstream, relay
from gateway.upstream import EgressGuard, EgressResolver, build_session, client_error

access_log = get_logger("gateway.access")
tunnel_log = get_logger("gateway.tunnel")
log = get_logger("gateway.server")


class GatewayProtocol(RequestHandler):
    """aiohttp's per-connection protocol, with parser failures answered as JSON errors (431/400)."""

    client_eof = False  # the client half-closed while a CONNECT was pending

    def eof_received(self) -> bool | None:  # type: ignore[override]
        """Keep a CONNECT's transport open on the client's FIN: the tunnel passes the FIN on."""
        if self._upgraded:  # aiohttp's parser marks CONNECT (and Upgrade) requests this way
            self.client_eof = True
            return True
        return None

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


class GatewayServer(web.Server):
    """Builds `GatewayProtocol` instead of aiohttp's plain RequestHandler."""

    def __call__(self) -> RequestHandler:
        return GatewayProtocol(self, loop=self._loop, **self._kwargs)


class Gateway:
    """Owns the listeners, the upstream session and the live `Pipeline` (swapped whole, never mutated)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.pipeline = Pipeline(config)
        proxy_host = URL(config.upstream.proxy).host if config.upstream.proxy else None
        self.guard = EgressGuard(self.pipeline.allowlist, frozenset({proxy_host} if proxy_host else ()))
        self.resolver = EgressResolver(self.guard, config.resolve)
        self.tunnels = TunnelStats()
        self.limiter: RateLimiter | None = None
        self.tunnel_limiter: RateLimiter | None = None
        self.ready = False
        self._session: aiohttp.ClientSession | None = None
        self._runners: list[web.BaseRunner] = []
        self.ports: dict[str, int] = {}

    @property
    def config(self) -> GatewayConfig:
        return self.pipeline.config

    async def start(self) -> None:
        config = self.config
        self._session = build_session(config, self.guard, self.resolver)
        self.limiter = RateLimiter(rate_limit_settings(config))
        self.tunnel_limiter = RateLimiter(tunnel_limit_settings(config))
        header_bytes = config.limits.max_header_kb * 1024
        proxy = GatewayServer(
            self.handle,
            handler_cancellation=True,
            auto_decompress=False,
            max_line_size=header_bytes,
            max_field_size=header_bytes,
            max_headers=256,
            access_log=None,
        )
        self.ports["listen"] = await self._listen(
            web.ServerRunner(proxy, shutdown_timeout=config.shutdown_timeout_s),
            config.listen.host,
            config.listen.port,
        )
        admin = web.AppRunner(self._admin_app(), access_log=None)
        self.ports["admin"] = await self._listen(admin, config.admin.host, config.admin.port)
        self.ready = True
        log.info("gateway_started", listen=self.ports["listen"], admin=self.ports["admin"])

    async def _listen(self, runner: web.BaseRunner, host: str, port: int) -> int:
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        server: Any = site._server
        return int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Drain: refuse readiness, stop accepting, let in-flight requests finish (bounded), then close."""
        self.ready = False
        log.info("gateway_draining", timeout_s=self.config.shutdown_timeout_s)
        proxy_runner, *others = self._runners
        await proxy_runner.cleanup()
        for runner in others:
            await runner.cleanup()
        if self._session is not None:
            await self._session.close()
        for limiter in (self.limiter, self.tunnel_limiter):
            if limiter is not None:
                await limiter.close()
        log.info("gateway_stopped")

    def _admin_app(self) -> web.Application:
        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def readyz(_: web.Request) -> web.Response:
            if self.ready:
                return web.json_response({"status": "ready"})
            return web.json_response({"status": "draining"}, status=503)

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        return app

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Run one request through the pipeline and log exactly one access event for it."""
        pipeline = self.pipeline
        raw_target = request.raw_path
        exchange = Exchange(
            request_id=request_id(request.headers.get("X-Request-Id")),
            method=request.method,
            path=raw_target.partition("?")[0][:2048],
            client_ip=request.remote or "",
            token_digest=digest_of(request.headers.get("Authorization")),
        )
        started = time.perf_counter()
        try:
            response = await self._process(request, pipeline, exchange, raw_target)
        except asyncio.CancelledError:
            exchange.status = exchange.status or 499
            exchange.decisions.append("client:disconnected")
            raise
        finally:
            self._log_access(exchange, started)
        return response

    async def _process(
        self, request: web.BaseRequest, pipeline: Pipeline, exchange: Exchange, raw_target: str
    ) -> web.StreamResponse:
        error = self._precheck(request, pipeline, exchange)
        if error is not None:
            return self._fail(exchange, error, request)
        if request.method == "CONNECT":
            return await self._connect(request, pipeline, exchange, raw_target)
        location = pipeline.browser_redirect(
            exchange, request.method, raw_target, request.headers.get("Accept", "")
        )
        if location is not None:
            exchange.status = 302
            return web.Response(
                status=302, headers={"Location": location, "X-Request-Id": exchange.request_id}
            )
        target: Target | GatewayError
        if raw_target.startswith("/"):
            path, _, query = raw_target.partition("?")
            target = pipeline.target(exchange, path.partition("#")[0], query.partition("#")[0])
        elif raw_target.startswith(("http://", "https://", "HTTP://", "HTTPS://")):
            target = pipeline.absolute_target(
                exchange, raw_target, request.headers.get("Proxy-Authorization")
            )
        else:
            exchange.decisions.append("route:bad_target")
            target = GatewayError(Code.BAD_REQUEST, "request target must be an absolute path")
        if isinstance(target, GatewayError):
            return self._fail(exchange, target, request)
        refused = pipeline.admit(exchange, target)
        if refused is not None:
            return self._fail(exchange, refused, request)
        assert self.limiter is not None
        key = rate_key(exchange.token_digest, exchange.client_ip, self.limiter.settings.anonymous)
        if isinstance(key, GatewayError):
            exchange.decisions.append("ratelimit:anonymous_denied")
            return self._fail(exchange, key, request)
        decision = await self.limiter.check(target.route.name, key)
        exchange.decisions.append(f"ratelimit:{decision.outcome}")
        if decision.error is not None:
            return self._fail(exchange, decision.error, request)
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert self._session is not None
        try:
            return await forward(
                request,
                exchange,
                target,
                self._session,
                max_body=pipeline.max_body_bytes,
                proxy=pipeline.config.upstream.proxy,
                extra_headers=decision.headers,
                rules=pipeline.rewrite_rules(target, request.remote, request.scheme, request.headers),
            )
        except (GatewayFailure, aiohttp.ClientError, OSError, TimeoutError) as exc:
            return self._fail(exchange, client_error(exc), request)

    def _precheck(
        self, request: web.BaseRequest, pipeline: Pipeline, exchange: Exchange
    ) -> GatewayError | None:
        """Refusals that need no route: oversized headers or declared body."""
        header_bytes = sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
        if header_bytes > pipeline.max_header_bytes:
            exchange.decisions.append("limits:headers")
            return GatewayError(Code.HEADERS_TOO_LARGE, "request header fields are too large")
        length = request.content_length
        if length is not None and length > pipeline.max_body_bytes:
            exchange.decisions.append("limits:body")
            return GatewayError(Code.BODY_TOO_LARGE, "request body is over the limit")
        return None

    async def _connect(
        self, request: web.BaseRequest, pipeline: Pipeline, exchange: Exchange, raw_target: str
    ) -> web.StreamResponse:
        """CONNECT: every check first, then connect, then answer 200 and relay until the tunnel ends."""
        policy = pipeline.forward_proxy
        if policy is None:
            target = parse_connect_target(raw_target)
            denied = (
                target
                if isinstance(target, GatewayError)
                else pipeline.allowlist.check(target.host, target.port)
            )
            exchange.decisions.append("forward_proxy:disabled")
            return self._fail(
                exchange, denied or GatewayError(Code.METHOD_NOT_ALLOWED, "CONNECT is not enabled"), request
            )
        error = pipeline.authenticate(exchange, request.headers.get("Proxy-Authorization"))
        target = parse_connect_target(raw_target)
        if error is None and isinstance(target, GatewayError):
            error = target
        if error is None and not isinstance(target, GatewayError):
            exchange.upstream_host = target.host
            error = policy.check_target(target)
            exchange.decisions.append("forward_proxy:deny" if error else "forward_proxy:allow")
            if error is None:
                assert self.tunnel_limiter is not None
                decision = await self.tunnel_limiter.check(TUNNEL_ROUTE, "ip:" + exchange.client_ip)
                exchange.decisions.append(f"tunnel_limit:{decision.outcome}")
                error = decision.error
        if error is not None or isinstance(target, GatewayError):
            self.tunnels.refused += 1
            assert error is not None
            return self._fail(exchange, error, request)
        try:
            reader, writer, address = await connect_upstream(
                target, policy, self.resolver, pipeline.config.upstream.connect_timeout_s
            )
        except GatewayFailure as exc:
            self.tunnels.refused += 1
            return self._fail(exchange, exc.error, request)
        exchange.status = 200
        exchange.decisions.append("tunnel:open")
        result = TunnelResult(address=address)
        stats = self.tunnels
        stats.opened += 1
        stats.active += 1
        started = time.perf_counter()
        try:
            await relay(request, (reader, writer), result, pipeline.config.forward_proxy.idle_timeout_s)
        except asyncio.CancelledError:
            result.reason = "cancelled"
            raise
        finally:
            stats.active -= 1
            stats.bytes_up += result.bytes_up
            stats.bytes_down += result.bytes_down
            stats.close_reasons[result.reason] = stats.close_reasons.get(result.reason, 0) + 1
            exchange.bytes_in, exchange.bytes_out = result.bytes_up, result.bytes_down
            tunnel_log.info(
                "tunnel",
                client=exchange.client_ip,
                target=target.authority,
                address=result.address,
                bytes_up=result.bytes_up,
                bytes_down=result.bytes_down,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
                reason=result.reason,
                request_id=exchange.request_id,
            )
        return web.Response()  # never sent: the connection was handed back to aiohttp closed

    def _fail(self, exchange: Exchange, error: GatewayError, request: web.BaseRequest) -> web.Response:
        exchange.error = error
        exchange.status = error.status
        if error.code is Code.EGRESS_DENIED:
            log.warning("egress_denied", host=exchange.upstream_host, request_id=exchange.request_id)
        # An unread request body would otherwise be drained (or smuggled as the next request): close instead.
        close = (request.body_exists and not request.content.at_eof()) or getattr(
            request.protocol, "client_eof", False
        )
        return error_response(error, exchange.request_id, close=close)

    @staticmethod
    def _log_access(exchange: Exchange, started: float) -> None:
        access_log.info(
            "access",
            method=exchange.method,
            path=exchange.path,
            route=exchange.route,
            upstream_host=exchange.upstream_host,
            status=exchange.status,
            bytes_in=exchange.bytes_in,
            bytes_out=exchange.bytes_out,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            request_id=exchange.request_id,
            token_fp=exchange.token_digest[:FINGERPRINT_HEX] if exchange.token_digest else None,
            client=exchange.client_ip,
            error_code=str(exchange.error.code) if exchange.error else None,
            decisions=exchange.decisions,
        )
