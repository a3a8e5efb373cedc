"""The aiohttp wiring: one low-level server whose single handler runs the pipeline, plus the admin listener.

A low-level `web.Server` (no router) is used on purpose: every method, CONNECT included, and every
request target reaches the pipeline unaltered, and parser errors get the same JSON errors as the rest.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.config.model import Admin, GatewayConfig, Listen
from gateway.errors import Code, GatewayError, GatewayFailure
from gateway.forward import forward
from gateway.generation import Generation
from gateway.logs import get_logger
from gateway.pipeline import BAD_TARGET, CLIENT_GONE, TUNNEL_ROUTE, Exchange, Pipeline, Target, request_id
from gateway.policy.credentials import FINGERPRINT_HEX, digest_of
from gateway.policy.forward_proxy import parse_connect_target
from gateway.responses import SERVER, error_response, parse_error, redirect_response
from gateway.tunnel import TunnelResult, TunnelStats, relay

access_log = get_logger("gateway.access")
tunnel_log = get_logger("gateway.tunnel")
log = get_logger("gateway.server")
SHUTTING_DOWN = GatewayError(Code.SHUTTING_DOWN, "the gateway is shutting down")


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


class StartupError(Exception):
    """A listener could not be opened; the message names it and says why, in one line."""


class Gateway:
    """Owns the listeners and the live `Generation` (the config's runtime, swapped whole, never mutated)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.generation: Generation | None = None
        self.tunnels = TunnelStats()
        self.ready = False
        self.started = False
        self.stopping = False
        self._runners: list[web.BaseRunner] = []
        self.ports: dict[str, int] = {}

    async def start(self, origin: str = "") -> None:
        """Build the generation, then listen. On failure, `stop()` releases whatever was opened.

        `origin` (the config file, or built-in defaults) is logged with the start-up event.
        """
        config = self.config
        self.generation = await Generation.build(config)
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
            web.ServerRunner(proxy, shutdown_timeout=config.shutdown_timeout_s), "listen", config.listen
        )
        admin = web.AppRunner(self._admin_app(), access_log=None)
        self.ports["admin"] = await self._listen(admin, "admin", config.admin)
        self.ready = self.started = True
        log.info("gateway_started", listen=self.ports["listen"], admin=self.ports["admin"], config=origin)

    async def _listen(self, runner: web.BaseRunner, name: str, where: Listen | Admin) -> int:
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, where.host, where.port, backlog=1024, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
            raise StartupError(f"cannot listen on {where.host}:{where.port} ({name}): {reason}") from None
        server: Any = site._server
        return int(server.sockets[0].getsockname()[1])

    def drain(self) -> None:
        """First step of a graceful stop: `/readyz` answers 503 while the proxy port keeps serving."""
        if self.ready:
            self.ready = False
            log.info("gateway_draining", shutdown_delay_s=self.config.shutdown_delay_s)

    async def stop(self) -> None:
        """Stop accepting, give in-flight requests `shutdown_timeout_s`, then close everything.

        Safe after a partial start, and safe to call twice.
        """
        self.drain()
        self.stopping = True
        if self.started:
            log.info("gateway_stopping", shutdown_timeout_s=self.config.shutdown_timeout_s)
        while self._runners:
            await self._runners.pop(0).cleanup()  # the proxy listener first, the admin one last
        if self.generation is not None:
            await self.generation.close()
            self.generation = None
        if self.started:
            log.info("gateway_stopped")

    def _admin_app(self) -> web.Application:
        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def readyz(_: web.Request) -> web.Response:
            generation = self.generation
            if not self.ready or generation is None:
                return web.json_response({"status": "draining"}, status=503)
            if not await generation.limiter.ready():
                return web.json_response({"status": "rate_limit_storage_unavailable"}, status=503)
            return web.json_response({"status": "ready"})

        async def server_header(_: web.Request, response: web.StreamResponse) -> None:
            response.headers["Server"] = SERVER

        app = web.Application()
        app.on_response_prepare.append(server_header)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        return app

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Run one request through the pipeline and log exactly one access event for it."""
        generation = self.generation
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
            if generation is None:  # a request accepted while the gateway was closing
                return self._fail(exchange, SHUTTING_DOWN, request)
            return await self._process(request, generation, exchange, raw_target)
        except asyncio.CancelledError:
            if self.stopping and not _client_closed(request):
                exchange.refuse(SHUTTING_DOWN)  # cut at the shutdown deadline, not by the client
            else:
                exchange.client_gone()
            raise
        finally:
            self._log_access(exchange, started)

    async def _process(
        self, request: web.BaseRequest, generation: Generation, exchange: Exchange, raw_target: str
    ) -> web.StreamResponse:
        pipeline = generation.pipeline
        error = self._precheck(request, pipeline, exchange)
        if error is not None:
            return self._fail(exchange, error, request)
        if request.method == "CONNECT":
            return await self._connect(request, generation, exchange, raw_target)
        location = pipeline.browser_redirect(
            exchange, request.method, raw_target, request.headers.get("Accept", "")
        )
        if location is not None:
            exchange.status = 302
            return redirect_response(location, exchange.request_id)
        target: Target | GatewayError
        if raw_target.startswith("/"):
            path, _, query = raw_target.partition("?")
            target = pipeline.target(exchange, path.partition("#")[0], query.partition("#")[0])
        elif raw_target.startswith(("http://", "https://", "HTTP://", "HTTPS://")):
            target = await pipeline.absolute_target(
                exchange, raw_target, request.headers.get("Proxy-Authorization")
            )
        else:
            exchange.decisions.append("route:bad_target")
            target = BAD_TARGET
        if isinstance(target, GatewayError):
            return self._fail(exchange, target, request)
        refused = pipeline.admit(exchange, target)
        if refused is not None:
            return self._fail(exchange, refused, request)
        decision = await generation.limiter.decide(
            target.route.name, exchange.token_digest, exchange.client_ip
        )
        exchange.decisions.append(f"ratelimit:{decision.outcome}")
        if decision.error is not None:
            return self._fail(exchange, decision.error, request)
        if request.headers.get("Expect", "").lower() == "100-continue":
            try:
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            except ConnectionError:
                return self._fail(exchange, CLIENT_GONE, request)
        try:
            return await forward(
                request,
                exchange,
                target,
                generation.session,
                max_body=pipeline.max_body_bytes,
                proxy=pipeline.config.upstream.proxy,
                extra_headers=decision.headers,
                rules=pipeline.rewrite_rules(target, request.remote, request.scheme, request.headers),
            )
        except GatewayFailure as exc:
            return self._fail(exchange, exc.error, request)

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
        self, request: web.BaseRequest, generation: Generation, exchange: Exchange, raw_target: str
    ) -> web.StreamResponse:
        """CONNECT: every check first, then connect, then answer 200 and relay until the tunnel ends."""
        pipeline = generation.pipeline
        policy = pipeline.forward_proxy
        if policy is None or generation.dialer is None:
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
        error = await pipeline.authenticate(exchange, request.headers.get("Proxy-Authorization"))
        target = parse_connect_target(raw_target)
        if error is None and isinstance(target, GatewayError):
            error = target
        if error is None and not isinstance(target, GatewayError):
            exchange.upstream_host = target.host
            error = policy.check_target(target)
            exchange.decisions.append("forward_proxy:deny" if error else "forward_proxy:allow")
            if error is None:
                decision = await generation.tunnel_limiter.check(TUNNEL_ROUTE, "ip:" + exchange.client_ip)
                exchange.decisions.append(f"tunnel_limit:{decision.outcome}")
                error = decision.error
        if error is not None or isinstance(target, GatewayError):
            self.tunnels.refused += 1
            assert error is not None
            return self._fail(exchange, error, request)
        try:
            reader, writer, address = await generation.dialer.connect(target)
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
        exchange.refuse(error)
        if error.code is Code.EGRESS_DENIED:
            log.warning(
                "egress_denied",
                host=exchange.upstream_host,
                reason=error.why,
                request_id=exchange.request_id,
                **dict(error.context),
            )
        # An unread request body would otherwise be drained (or smuggled as the next request): close instead.
        close = (request.body_exists and not request.content.at_eof()) or getattr(
            request.protocol, "client_eof", False
        )
        return error_response(error, exchange.request_id, close=close)

    @staticmethod
    def _log_access(exchange: Exchange, started: float) -> None:
        error = exchange.error
        access_log.info(
            "access",
            method=exchange.method,
            path=exchange.path,
            route=exchange.route,
            upstream_host=exchange.upstream_host,
            status=exchange.status,
            upstream_status=exchange.upstream_status,
            bytes_in=exchange.bytes_in,
            bytes_out=exchange.bytes_out,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            request_id=exchange.request_id,
            token_fp=exchange.token_digest[:FINGERPRINT_HEX] if exchange.token_digest else None,
            client=exchange.client_ip,
            error_code=str(error.code) if error else None,
            reason=error.why if error else None,
            decisions=exchange.decisions,
            **(dict(error.context) if error else {}),
        )


def _client_closed(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
