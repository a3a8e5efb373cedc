"""A fake Braintrust control plane and data plane (aiohttp, in memory) for driving the real SDK.

Only what the Python SDK 0.47.0 calls in tests/integration/test_sdk_e2e.py is implemented. Every request is
recorded per plane (method, path, headers), so tests can check which hops reached which plane.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Plane:
    """One plane's record of what reached it."""

    name: str
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


@dataclass
class Store:
    projects: dict[str, dict[str, Any]] = field(default_factory=dict)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # experiments and datasets by id
    rows: list[dict[str, Any]] = field(default_factory=list)


def _record(plane: Plane) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        plane.requests.append((request.method, request.path_qs, dict(request.headers)))
        return await handler(request)

    return middleware


def control_plane(plane: Plane, data_plane_url: list[str], own_url: list[str]) -> web.Application:
    """POST /api/apikey/login answers with org_info pointing at the data plane."""

    async def login(_: web.Request) -> web.Response:
        org = {
            "id": "org-1",
            "name": "acme",
            "api_url": data_plane_url[0],
            "proxy_url": data_plane_url[0],
            "realtime_url": None,
            "git_metadata": None,
            "is_universal_api": True,
            "app_url": own_url[0],  # something the app-URL rule rewrites to public_url
        }
        return web.json_response({"org_info": [org]})

    async def other(request: web.Request) -> web.Response:
        return web.json_response({"error": f"fake control plane has no {request.path}"}, status=404)

    app = web.Application(middlewares=[_record(plane)])
    app.router.add_post("/api/apikey/login", login)
    app.router.add_route("*", "/{tail:.*}", other)
    return app


def data_plane(plane: Plane, store: Store) -> web.Application:
    async def project(request: web.Request) -> web.Response:
        body = await request.json()
        existing = next((p for p in store.projects.values() if p["name"] == body["name"]), None)
        if existing is None:
            existing = {"id": str(uuid.uuid4()), "name": body["name"], "org_id": "org-1"}
            store.projects[existing["id"]] = existing
        return web.json_response(existing)

    async def create(request: web.Request) -> web.Response:
        body = await request.json()
        kind = request.match_info["kind"]
        obj = {
            "id": str(uuid.uuid4()),
            "name": body.get("name") or f"{kind}-1",
            "project_id": body["project_id"],
            "created": "2026-11-22T00:00:00Z",
            "kind": kind,
        }
        store.objects[obj["id"]] = obj
        return web.json_response(obj)

    async def logs3(request: web.Request) -> web.Response:
        body = await request.json()
        rows = body.get("rows", body) if isinstance(body, dict) else body
        for row in rows:
            store.rows.append(row)
        return web.json_response({"ids": [row.get("id") for row in rows]})

    async def version(_: web.Request) -> web.Response:
        return web.json_response({"logs3_payload_max_bytes": 6 * 1024 * 1024})

    async def summarize(request: web.Request) -> web.Response:
        oid = request.match_info["oid"]
        scored = [r for r in store.rows if r.get("experiment_id") == oid and r.get("scores")]
        names = sorted({name for r in scored for name in r["scores"]})
        scores = {
            name: {
                "name": name,
                "score": sum(r["scores"][name] for r in scored if name in r["scores"]) / len(scored),
                "improvements": 0,
                "regressions": 0,
            }
            for name in names
        }
        return web.json_response({"scores": scores, "metrics": {}})

    async def fetch(request: web.Request) -> web.Response:
        oid = request.match_info["oid"]
        events = [r for r in store.rows if r.get("dataset_id") == oid]
        return web.json_response({"events": events, "cursor": None})

    async def other(request: web.Request) -> web.Response:
        return web.json_response({"error": f"fake data plane has no {request.path}"}, status=404)

    app = web.Application(middlewares=[_record(plane)], client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/project", project)
    app.router.add_post("/v1/{kind:experiment|dataset}", create)
    app.router.add_post("/logs3", logs3)
    app.router.add_route("*", "/version", version)
    app.router.add_get("/v1/experiment/{oid}/summarize", summarize)
    app.router.add_post("/v1/dataset/{oid}/fetch", fetch)
    app.router.add_route("*", "/{tail:.*}", other)
    return app
