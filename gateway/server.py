"""The aiohttp wiring: listeners and the live generation (swapped whole by reload.py); admin.py serves admin.

A low-level `web.Server` (no router) is used on purpose: every method, CONNECT included, and every request
target reaches the handler unaltered, and parser errors get the same JSON errors as the rest.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from typing import Any

from aiohttp import web

from gateway import aiohttp_internals
from gateway.admin import Readiness, admin_app
from gateway.config.certs import CertProblem
from gateway.config.model import Admin, GatewayConfig
from gateway.config.redact import config_sha256
from gateway.errors import Code, GatewayError
from gateway.exchange import Exchange, request_id
from gateway.explain import Report, explain, request_from_json
from gateway.generation import BuildError, Generation
from gateway.handler import ProxyHandler
from gateway.listener_tls import ListenerTls
from gateway.listeners import StartupError, listen, warn_if_admin_unreachable
from gateway.logs import configure, get_logger
from gateway.metrics import Metrics
from gateway.policy.admin_access import AdminAccess
from gateway.policy.credentials import digest_of
from gateway.protocol import ClientLimits, GatewayServer
from gateway.reload import Coalesced, ConfigSource, Reloader, ReloadResult, log_warnings
from gateway.status import StatusBoard
from gateway.status_page import StatusPage
from gateway.tunnel import Tunnels, TunnelStats

log = get_logger("gateway.server")
SHUTTING_DOWN = GatewayError(Code.SHUTTING_DOWN, "the gateway is shutting down")
TLS_KEPT = (
    "listen.tls: the certificate pair did not load (see tls_reload_failed); the rest of the config was "
    "reloaded and the previous certificate keeps serving"
)
DRAIN_CEILING_S = 24 * 3600.0  # aiohttp's own drain bound; stop() cancels at shutdown_timeout_s instead


class Gateway:
    """Owns the listeners, the metrics and the live `Generation`; everything else hangs off the generation."""

    def __init__(self, config: GatewayConfig, source: ConfigSource | None = None, worker: int = 0) -> None:
        """`source` re-reads the config (file, env, flags) for a reload; without one, reload is refused.

        `worker` is this process's index under `workers: N`: its admin listener is `admin.port + worker`.
        """
        self.config = config  # the running one: a reload replaces it
        self.bound = config  # the one it started with: listeners, workers (gateway/reload.py)
        self.worker = worker
        self.generation: Generation | None = None
        self.metrics = Metrics()
        self.handler = ProxyHandler(Tunnels(self.metrics), self.metrics)
        self.status = StatusBoard(self, self.metrics)
        self.ready = False
        self.started = False
        self.stopping = False
        self.ports: dict[str, int] = {}
        self._runners: list[web.BaseRunner] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._retired: list[Generation] = []
        self._reloader = Reloader(self, source, self.metrics)
        self._reloads = Coalesced(self._reload_now)
        self.metrics.delay_queued.set_function(self.delayed_requests)
        self._proxy_server: GatewayServer | None = None
        self._tls: ListenerTls | None = None  # the proxy listener's, with `listen.tls`
        self._deadline_passed = False  # stop() cancelled what was still running
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._admin_access = admin_access(config.admin)

    @property
    def tunnels(self) -> TunnelStats:
        return self.handler.tunnels.stats

    @property
    def open_connections(self) -> int:
        return self._proxy_server.open_connections if self._proxy_server is not None else 0

    def delayed_requests(self) -> int:
        """Requests waiting for a rate-limit slot now (`on_limit: delay`): one set of queues serves every
        generation (gateway/policy/ratelimit.py), so the live one's count is all of them."""
        generation = self.generation
        return generation.limiter.queues.waiting if generation is not None else 0

    async def start(self, origin: str = "") -> None:
        """Build the generation, then listen. On failure, `stop()` releases whatever was opened.

        `origin` (the config file, or built-in defaults) is logged with the start-up event.
        """
        config = self.config
        self._loop = asyncio.get_running_loop()
        try:
            aiohttp_internals.check()
        except aiohttp_internals.AiohttpMismatch as exc:
            raise StartupError(str(exc)) from None
        self.generation = await Generation.build(config, observer=self.metrics)
        self.metrics.config_loaded(config_sha256(config))
        self._proxy_server = proxy = GatewayServer(
            self.handle,
            limits=_client_limits(config),
            handler_cancellation=True,
            auto_decompress=False,
            max_headers=256,
            access_log=None,
        )
        runner = web.ServerRunner(proxy, shutdown_timeout=DRAIN_CEILING_S)
        shared = config.workers > 1  # the workers share the listen port; the kernel spreads connections
        proxy_at, admin = config.listen, config.admin
        self._runners.append(runner)
        tls = self._listener_tls(config)
        self.ports["listen"] = await listen(runner, "listen", proxy_at.host, proxy_at.port, shared, tls=tls)
        if self._tls is not None:
            self._tls.watch()
        admin_port = admin.port + self.worker if admin.port else 0
        app = admin_app(
            self._readiness,
            self.metrics.render,
            self.reload,
            lambda: self._admin_access,
            self.explain,
            status=self.status.snapshot,
            page=StatusPage.load(),
        )
        admin_runner = web.AppRunner(app, access_log=None)
        self._runners.append(admin_runner)
        self.ports["admin"] = await listen(admin_runner, "admin", admin.host, admin_port)
        warn_if_admin_unreachable(admin.host, self.ports["admin"])
        self.ready = self.started = True
        self.status.serving(config, origin)
        self.status.history.start(self._loop)
        where = {"worker": self.worker, "pid": os.getpid()} if shared else {}
        log.info(
            "gateway_started",
            listen=self.ports["listen"],
            admin=self.ports["admin"],
            config=origin,
            tls=self._tls is not None,
            **where,
        )
        log_warnings(self.generation)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """One request on the current generation, which it holds until it ends; logged and counted once."""
        generation = self.generation
        headers = request.headers
        exchange = Exchange(
            request_id=request_id(headers.get("X-Request-Id")),
            method=request.method,
            raw_target=request.raw_path,
            client_ip=request.remote or "",
            headers=headers,
            scheme=request.scheme,
            token_digest=digest_of(headers.get("Authorization")),
        )
        started = time.perf_counter()
        task = asyncio.current_task(self._loop)  # given the loop: no getpid() syscall to find it
        assert task is not None
        self._handlers.add(task)
        if generation is not None:
            generation.enter()
        try:
            if generation is None:  # accepted while the gateway was closing
                return self.handler.fail(exchange, SHUTTING_DOWN, request)
            return await self.handler.serve(request, generation, exchange)
        except asyncio.CancelledError:
            if self._deadline_passed:
                exchange.refuse(SHUTTING_DOWN)  # cut at the shutdown deadline, not by the client
            else:
                exchange.client_gone()
            raise
        finally:
            self._handlers.discard(task)
            if generation is not None:
                generation.leave()
            self.handler.finish(exchange, started, generation)

    async def reload(self) -> ReloadResult:
        """Re-read and rebuild the config (gateway/reload.py); on any problem keep serving.

        The one entry point for SIGHUP, `POST /reload` and `serve --watch`, coalesced: one reload runs at
        a time, and every ask that comes meanwhile is answered by one more, which reads the file anew.
        """
        return await self._reloads()

    async def _reload_now(self) -> ReloadResult:
        """One reload. With TLS, the certificate and key are read again too (the check has just loaded
        them)."""
        result = await self._reloader.reload()
        if result.ok:
            self.status.serving(self.config, result.origin)
        tls, settings = self._tls, self.config.listen.tls
        if result.ok and tls is not None and settings is not None and not await tls.use(settings):
            result = ReloadResult(False, result.origin, (TLS_KEPT,), result.restart_needed)  # changed since
        self.status.reloaded(result)
        return result

    async def explain(self, body: dict[str, Any]) -> Report:
        """POST /explain: the request `body` names, explained on the live generation, which it holds (as
        a request does) so a reload cannot close it meanwhile. ValueError for a body naming no request."""
        request = request_from_json(body)
        generation = self.generation
        if generation is None:
            raise ValueError("the gateway is shutting down")
        generation.enter()
        try:
            return await explain(generation, request, live=True)
        finally:
            generation.leave()

    def swap(self, fresh: Generation) -> Generation:
        """Serve new requests on `fresh`; requests and tunnels in flight finish on the one it returns."""
        current = self.generation
        assert current is not None  # the reloader only swaps a running gateway
        self.generation, self.config = fresh, fresh.config
        self._admin_access = admin_access(fresh.config.admin)  # a rotated admin.token applies at once
        self.metrics.storage_up(fresh.limiter.storage.health.up)  # the store serving now (maybe a new one)
        self._retired = [g for g in self._retired if not g.is_closed] + [current]
        current.retire()
        if self._proxy_server is not None:  # new connections get the new client limits (keep-alive too)
            self._proxy_server.limits = _client_limits(fresh.config)
        if current.config.logging != fresh.config.logging:
            configure(fresh.config.logging.level, fresh.config.logging.format)
        return current

    def reopen_logs(self) -> None:
        """After a log rotation (SIGHUP): the audit file is opened again under its configured name."""
        if self.generation is not None and self.generation.audit is not None:
            self.generation.audit.sink.reopen()

    def drain(self) -> None:
        """First step of a graceful stop: `/readyz` answers 503 while the proxy port keeps serving."""
        if self.ready:
            self.ready = False
            log.info("gateway_draining", shutdown_delay_s=self.config.shutdown_delay_s)

    async def stop(self) -> None:
        """Stop accepting, give requests and tunnels `shutdown_timeout_s`, cancel the rest, close all.

        Bounded: at the deadline every request still running is cancelled, tunnels included. Safe after a
        partial start and safe to call twice.
        """
        self.drain()
        self.stopping = True
        if self.generation is not None:  # one set of queues for every generation (policy/ratelimit.py)
            self.generation.limiter.queues.stop()
        self.status.history.stop()
        if self._tls is not None:
            await self._tls.close()
        timeout = self.config.shutdown_timeout_s
        if self.started:
            log.info("gateway_stopping", shutdown_timeout_s=timeout, in_flight=len(self._handlers))
        deadline = asyncio.get_running_loop().call_later(timeout, self._cancel_handlers)
        try:
            # aiohttp's cleanup stops accepting, closes idle keep-alive connections and waits for busy
            # ones; at the deadline whatever is still running (tunnels too) is cancelled.
            while self._runners:
                await self._runners.pop(0).cleanup()  # the proxy listener first, the admin one last
        finally:
            deadline.cancel()
        for generation in self._retired:
            await generation.closed()
        self._retired.clear()
        if self.generation is not None:
            await self.generation.close()
            self.generation = None
        if self.started:
            log.info("gateway_stopped")

    def _listener_tls(self, config: GatewayConfig) -> tuple[ssl.SSLContext, float] | None:
        """With `listen.tls`: the live context and the handshake bound, `limits.header_timeout_s` as at
        start (the head's own bound starts after the handshake; see gateway/listeners.py)."""
        if config.listen.tls is None:
            return None
        try:
            self._tls = ListenerTls(config.listen.tls)
        except CertProblem as exc:  # the files changed since the config was checked
            raise BuildError(("listen", "tls", exc.key), exc.message) from None
        return self._tls.context, config.limits.header_timeout_s

    def _cancel_handlers(self) -> None:
        self._deadline_passed = True
        for task in self._handlers:
            task.cancel()

    async def _readiness(self) -> Readiness:
        """`/readyz`: draining, or the rate-limit store is down (degraded: ready when failing open)."""
        generation = self.generation
        if not self.ready or generation is None:
            return Readiness(False, "draining")
        state = await generation.limiter.readiness()
        if state == "ready":
            return Readiness(True, "ready")
        mode = generation.limiter.settings.on_storage_error
        return Readiness(state == "degraded", "degraded", "rate_limit_storage_unavailable", mode)


def _client_limits(config: GatewayConfig) -> ClientLimits:
    limits = config.limits
    return ClientLimits(
        limits.header_timeout_s,
        limits.max_client_connections,
        limits.keepalive_timeout_s,
        limits.max_header_kb * 1024,
    )


def admin_access(admin: Admin) -> AdminAccess:
    """The admin listener's rules; this host's own name (a pod's name, a container's id) is one of its."""
    return AdminAccess.build(admin.host, admin.token, admin.allowed_hosts, (socket.gethostname(),))
