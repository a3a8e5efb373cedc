"""One request from start to end: run the generation's chain, then its terminal step, then record it.

This is the one place where a `GatewayError` (a step's refusal, a terminal's failure) becomes a response,
and where every request, whatever became of it, is logged once and counted once.
"""

from __future__ import annotations

import time

from aiohttp import web

from gateway.bypass import BypassLog
from gateway.errors import Code, GatewayError, GatewayFailure
from gateway.exchange import CLIENT_GONE, Exchange
from gateway.generation import Generation
from gateway.logs import get_logger, info_enabled
from gateway.metrics import Metrics
from gateway.policy.credentials import FINGERPRINT_HEX
from gateway.responses import error_response, redirect_response
from gateway.steps import Decision
from gateway.tunnel import Tunnels

access_log = get_logger("gateway.access")
log = get_logger("gateway.handler")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ProxyHandler:
    """Serves requests on whichever generation the server hands it; owns no config of its own."""

    def __init__(self, tunnels: Tunnels, metrics: Metrics | None = None) -> None:
        self.tunnels = tunnels
        self._metrics = metrics
        self._bypasses = BypassLog()

    async def serve(
        self, request: web.BaseRequest, generation: Generation, exchange: Exchange
    ) -> web.StreamResponse:
        if request.method == "CONNECT":
            return await self._tunnel(request, generation, exchange)
        decision = await generation.http.run(exchange)
        if decision is not None:
            return self.answer(decision, request, exchange)
        if exchange.headers.get("Expect", "").lower() == "100-continue":
            try:  # only now: every step admitted the request, so the body may come
                await request.writer.write(CONTINUE)
            except ConnectionError:
                return self.fail(exchange, CLIENT_GONE, request)
        try:
            return await generation.forwarder.forward(request, exchange)
        except GatewayFailure as exc:
            return self.fail(exchange, exc.error, request)

    async def _tunnel(
        self, request: web.BaseRequest, generation: Generation, exchange: Exchange
    ) -> web.StreamResponse:
        decision = await generation.connect.run(exchange)
        if decision is not None:
            self.tunnels.refused()
            return self.answer(decision, request, exchange)
        assert generation.dialer is not None  # the chain refuses CONNECT when forward-proxy mode is off
        idle = generation.config.forward_proxy.idle_timeout_s
        error = await self.tunnels.run(request, exchange, generation.dialer, idle)
        if error is not None:
            return self.fail(exchange, error, request)
        return web.Response()  # never sent: the connection was handed back to aiohttp closed

    def answer(self, decision: Decision, request: web.BaseRequest, exchange: Exchange) -> web.Response:
        """A decision that ended the chain: its error, or its local reply."""
        if decision.error is not None:
            return self.fail(exchange, decision.error, request)
        assert decision.location is not None
        exchange.status = 302
        return redirect_response(decision.location, exchange.request_id)

    @staticmethod
    def fail(exchange: Exchange, error: GatewayError, request: web.BaseRequest) -> web.Response:
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

    def finish(self, exchange: Exchange, started: float, generation: Generation | None) -> None:
        """The request is over: one access event, one count, and its audit event when audit is on."""
        error = exchange.error
        for bypass in exchange.bypasses:
            self._bypasses.report(bypass, exchange.request_id)
        if exchange.would_refuse is not None:
            self._log_would_refuse(exchange, *exchange.would_refuse)
        if info_enabled():
            self._log_access(exchange, started, error)
        if self._metrics is not None:
            self._metrics.count(exchange)
        if generation is not None and generation.audit is not None:
            generation.audit.record(exchange)

    @staticmethod
    def _log_would_refuse(exchange: Exchange, step: str, error: GatewayError) -> None:
        """Report mode: what enforce mode would have sent this request (its access event says what was)."""
        log.warning(
            "would_refuse",
            step=step,
            reason=error.why,
            code=str(error.code),
            status=error.status,
            route=exchange.route,
            upstream_host=exchange.upstream_host,
            path=exchange.path,
            request_id=exchange.request_id,
        )

    @staticmethod
    def _log_access(exchange: Exchange, started: float, error: GatewayError | None) -> None:
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
