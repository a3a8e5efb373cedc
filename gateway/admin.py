"""The admin listener's application: probes, the metrics scrape and POST /reload, behind the access rules.

It knows nothing of the gateway itself: it is given the readiness check, the metrics renderer, the reload
and the current `AdminAccess` (gateway/policy/admin_access.py), which every request passes first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from aiohttp import web

from gateway.exchange import request_id
from gateway.logs import get_logger, loggable_target
from gateway.metrics import CONTENT_TYPE
from gateway.policy.admin_access import AdminAccess
from gateway.reload import ReloadResult
from gateway.responses import SERVER, error_response

log = get_logger("gateway.admin")


class Readiness(NamedTuple):
    """`/readyz`'s answer: 200 when `ready` (even degraded), else 503; the rest goes in the body."""

    ready: bool
    status: str  # ready | degraded | draining
    reason: str | None = None  # what degrades it: rate_limit_storage_unavailable
    on_storage_error: str | None = None  # and what requests get meanwhile: allow | deny


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_app(
    readiness: Callable[[], Awaitable[Readiness]],
    render_metrics: Callable[[], bytes],
    reload: Callable[[], Awaitable[ReloadResult]],
    access: Callable[[], AdminAccess],
) -> web.Application:
    """The application; `access` is asked per request, so a reload that changes admin.token applies."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        state = await readiness()
        body = {key: value for key, value in state._asdict().items() if value is not None and key != "ready"}
        return web.json_response(body, status=200 if state.ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=render_metrics(), headers={"Content-Type": CONTENT_TYPE})

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
    app.router.add_post("/reload", reload_config)
    return app
