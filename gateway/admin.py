"""The admin listener's application: probes, the metrics scrape, the status page, POST /reload and
POST /explain, behind the access rules.

It knows nothing of the gateway itself: it is given the readiness check, the metrics renderer, the status
snapshot and page, the reload, the explainer (gateway/explain.py) and the current `AdminAccess`
(gateway/policy/admin_access.py), which every request passes first. POST /explain changes nothing, but it
is not open: its answers tell how to get past the policy and which token fingerprints are near their
limit, so it is guarded as POST /reload is.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from aiohttp import web

from gateway.errors import Code, GatewayError
from gateway.exchange import request_id
from gateway.logs import get_logger, loggable_target
from gateway.metrics import CONTENT_TYPE
from gateway.policy.admin_access import AdminAccess
from gateway.reload import ReloadResult
from gateway.responses import SERVER, error_response
from gateway.status_page import StatusPage

log = get_logger("gateway.admin")


class Readiness(NamedTuple):
    """`/readyz`'s answer: 200 when `ready` (even degraded), else 503; the rest goes in the body."""

    ready: bool
    status: str  # ready | degraded | draining
    reason: str | None = None  # what degrades it: rate_limit_storage_unavailable
    on_storage_error: str | None = None  # and what requests get meanwhile: allow | deny


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A POST /explain body -> the `explain --json` document; ValueError for a body that names no request.
Explainer = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
NOT_AN_OBJECT = 'the body must be a JSON object such as {"url": "/v1/project", "token": "..."}'
Snapshot = Callable[[], Awaitable[dict[str, Any]]]
NOT_CACHED = {"Cache-Control": "no-store"}


def admin_app(
    readiness: Callable[[], Awaitable[Readiness]],
    render_metrics: Callable[[], bytes],
    reload: Callable[[], Awaitable[ReloadResult]],
    access: Callable[[], AdminAccess],
    explain: Explainer,
    *,
    status: Snapshot,
    page: StatusPage,
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

    async def status_page(_: web.Request) -> web.Response:
        return web.Response(body=page.body, headers=dict(page.headers))

    async def status_json(_: web.Request) -> web.Response:
        return web.json_response(await status(), headers=NOT_CACHED)

    async def reload_config(_: web.Request) -> web.Response:
        """200 `reloaded`; 200 `restart_needed` (applied but for the settings it names); 422 `failed`."""
        result = await reload()
        status = "failed" if not result.ok else "restart_needed" if result.restart_needed else "reloaded"
        body: dict[str, Any] = {"status": status, "config": result.origin}
        if not result.ok:
            body["problems"] = list(result.problems)
        if result.restart_needed:
            body["restart_needed"] = list(result.restart_needed)
        return web.json_response(body, status=200 if result.ok else 422)

    async def explain_request(request: web.Request) -> web.Response:
        rid = request_id(request.headers.get("X-Request-Id"))
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError(NOT_AN_OBJECT)
            report = await explain(body)
        except ValueError as exc:  # also a body that is not JSON (json.JSONDecodeError)
            detail = str(exc) if type(exc) is not json.JSONDecodeError else NOT_AN_OBJECT
            return error_response(GatewayError(Code.BAD_REQUEST, detail), rid)
        log.info(
            "explain",
            method=report["request"]["method"],
            path=loggable_target(report["request"]["url"]),
            outcome=report["outcome"],
            code=report["code"],
            token_fp=report["request"]["token_fingerprint"],
            client_ip=request.remote or "",
            request_id=rid,
        )
        return web.json_response(report)

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
    app.router.add_post("/explain", explain_request)
    return app
