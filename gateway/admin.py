"""The admin listener's application: probes, the metrics scrape, the status page and POST /reload, behind
the access rules.

It knows nothing of the gateway itself: it is given the readiness check, the metrics renderer, the status
snapshot and page, the reload and the current `AdminAccess` (gateway/policy/admin_access.py), which every
request passes first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.exchange import request_id
from gateway.logs import get_logger, loggable_target
from gateway.metrics import CONTENT_TYPE
from gateway.policy.admin_access import AdminAccess
from gateway.reload import ReloadResult
from gateway.responses import SERVER, error_response
from gateway.status_page import StatusPage

log = get_logger("gateway.admin")

Readiness = Callable[[], Awaitable[str | None]]  # None when ready, else the reason (the 503 body's status)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Snapshot = Callable[[], Awaitable[dict[str, Any]]]
NOT_CACHED = {"Cache-Control": "no-store"}


def admin_app(
    readiness: Readiness,
    render_metrics: Callable[[], bytes],
    reload: Callable[[], Awaitable[ReloadResult]],
    access: Callable[[], AdminAccess],
    *,
    status: Snapshot,
    page: StatusPage,
) -> web.Application:
    """The application; `access` is asked per request, so a reload that changes admin.token applies."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        reason = await readiness()
        if reason is not None:
            return web.json_response({"status": reason}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=render_metrics(), headers={"Content-Type": CONTENT_TYPE})

    async def status_page(_: web.Request) -> web.Response:
        return web.Response(body=page.body, headers=dict(page.headers))

    async def status_json(_: web.Request) -> web.Response:
        return web.json_response(await status(), headers=NOT_CACHED)

    async def reload_config(_: web.Request) -> web.Response:
        result = await reload()
        body: dict[str, Any] = {"status": "reloaded" if result.ok else "failed", "config": result.origin}
        if not result.ok:
            body["problems"] = list(result.problems)
        return web.json_response(body, status=200 if result.ok else 422)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every request, routed or not, passes the access rules before any handler runs."""
        refusal = access().check(request.method, request.path, request.headers)
        if refusal is None:
            return await handler(request)
        rid = request_id(request.headers.get("X-Request-Id"))
        log.warning(
            "admin_refused",
            code=str(refusal.code),
            method=request.method,
            path=loggable_target(request.raw_path),
            client_ip=request.remote or "",
            request_id=rid,
        )
        return error_response(refusal, rid)

    async def server_header(_: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = SERVER

    app = web.Application(middlewares=[guard])
    app.on_response_prepare.append(server_header)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status_page)
    app.router.add_get("/status.json", status_json)
    app.router.add_post("/reload", reload_config)
    return app
