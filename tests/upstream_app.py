"""A real upstream for tests: an aiohttp app on 127.0.0.1 that records what reached it."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_bytes: int
    peer_port: int = 0  # the connection it came on: equal ports, one kept-alive connection


@dataclass
class Recorder:
    requests: list[Seen] = field(default_factory=list)  # each appended once its body was read
    started: list[str] = field(default_factory=list)  # raw paths, appended as each request arrives
    sse_gate: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)


def make_app(recorder: Recorder, canary_url: str = "http://127.0.0.1:9/") -> web.Application:
    async def catch_all(request: web.Request) -> web.StreamResponse:
        recorder.started.append(request.raw_path)
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        seen = Seen(
            request.method, request.raw_path, list(request.headers.items()), size, peer[1] if peer else 0
        )
        recorder.requests.append(seen)
        path = request.path
        if path.startswith("/download/"):
            return await _download(request, int(path.rsplit("/", 1)[1]))
        if path == "/sse":
            return await _sse(request, recorder)
        if path == "/drip":
            return await _drip(request)
        if path == "/redirect":
            raise web.HTTPFound(canary_url)
        if path == "/gzip":
            body = gzip.compress(b'{"hello": "world"}')
            return web.Response(
                body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
            )
        if path == "/hang":
            try:
                await asyncio.sleep(3600)
            finally:
                recorder.disconnected.set()
        if path == "/ratelimited":
            return web.Response(text="ok", headers={"RateLimit": '"upstream";r=9;t=1'})
        if path.startswith("/status/"):
            return web.Response(status=int(path.rsplit("/", 1)[1]))
        if path == "/hop":
            return web.Response(
                text="ok",
                headers={"Connection": "X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5"},
            )
        echo = {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": list(request.headers.items()),
            "body_bytes": size,
        }
        response = web.Response(text=json.dumps(echo), content_type="application/json")
        if request.headers.get("x-bt-enable-audit") == "true":  # as Braintrust's API answers
            response.headers.update(audit_headers(path))
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", catch_all)
    return app


AUDITED_RESOURCES = [{"type": "project", "id": "p-1", "name": "demo"}]


def _envelope(payload: bytes, version: int = 1) -> str:
    return json.dumps({"v": version, "p": base64.b64encode(payload).decode()})


BAD_AUDIT = {
    "/audit/not-json": "{",
    "/audit/v2": _envelope(gzip.compress(b"[]"), version=2),
    "/audit/not-base64": '{"v": 1, "p": "%%%"}',
    "/audit/not-gzip": _envelope(b"plain"),
    "/audit/bomb": _envelope(gzip.compress(b"[" + b" " * 2**21 + b"]")),  # inflates past 1 MiB
    "/audit/deep-header": "[" * 3000 + "]" * 3000,  # past the parser's recursion limit
    "/audit/deep-payload": _envelope(gzip.compress(b"[" * 100_000 + b"]" * 100_000)),
    "/audit/nested-past-32": _envelope(gzip.compress(b"[" * 33 + b"]" * 33)),
    "/audit/nan": _envelope(gzip.compress(b'[{"type": "project", "id": NaN}]')),
}


def audit_headers(path: str) -> dict[str, str]:
    """Braintrust's audit answer; the resources header is malformed on the BAD_AUDIT paths."""
    return {
        "x-bt-audit-user-id": "u-1",
        "x-bt-audit-user-email": "alice@example.com",
        "x-bt-audit-normalized-url": "/v1/project/[id]",
        "x-bt-audit-resources": BAD_AUDIT.get(
            path, _envelope(gzip.compress(json.dumps(AUDITED_RESOURCES).encode()))
        ),
    }


async def _download(request: web.Request, size: int) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    block = b"x" * 2**16
    sent = 0 if request.method != "HEAD" else size
    while sent < size:
        part = block[: min(len(block), size - sent)]
        await response.write(part)
        sent += len(part)
    await response.write_eof()
    return response


DRIP = 30  # bytes of /drip, one every DRIP_EVERY_S: 1.5 s in all, never silent for longer than that step
DRIP_EVERY_S = 0.05


async def _drip(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = DRIP
    await response.prepare(request)
    for _ in range(DRIP):
        await asyncio.sleep(DRIP_EVERY_S)
        await response.write(b"x")
    await response.write_eof()
    return response


async def _sse(request: web.Request, recorder: Recorder) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: first\n\n")
    await recorder.sse_gate.wait()  # the test opens the gate only after it saw the first event
    await response.write(b"data: second\n\n")
    await response.write_eof()
    return response
