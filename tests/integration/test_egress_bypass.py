"""No request can move the destination: every attempt below leaves the canary listener untouched."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.config.model import GatewayConfig
from gateway.errors import Code, GatewayFailure
from gateway.policy.allowlist import Allowlist
from gateway.upstream import EgressGuard, EgressResolver, build_session
from tests.conftest import Canary, GatewayFactory, Upstream, route_to
from tests.integration.test_forward import headers_of, raw_request


def status_and_body(answer: bytes) -> tuple[int, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    "path",
    [
        "//127.0.0.1:{canary}/x",
        "/..//127.0.0.1:{canary}/x",
        "/%2F%2F127.0.0.1:{canary}/x",
        "/\\\\127.0.0.1:{canary}/x",
        "/@127.0.0.1:{canary}/x",
        "/.%2e/%2e%2e//127.0.0.1:{canary}",
    ],
)
async def test_paths_stay_on_the_route_upstream(
    start_gateway: GatewayFactory, upstream: Upstream, canary: Canary, path: str
) -> None:
    gw = await start_gateway(**route_to(upstream))
    raw = path.format(canary=canary.port)
    answer = await raw_request(
        gw.gateway.ports["listen"], f"GET {raw} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), 1
    )
    assert status_and_body(answer)[0] == 200
    seen = upstream.recorder.requests[-1]
    assert seen.raw_path == raw  # byte for byte, on the allow-listed upstream
    assert headers_of(seen.headers)["host"] == [f"127.0.0.1:{upstream.port}"]
    assert canary.accepts == []


@pytest.mark.parametrize(
    "headers",
    [
        "Host: 127.0.0.1:{canary}",
        "Host: 127.0.0.1:{canary}\r\nX-Forwarded-Host: 127.0.0.1:{canary}",
        "Host: x\r\nX-Original-URL: http://127.0.0.1:{canary}/\r\nX-Rewrite-URL: //127.0.0.1:{canary}/",
        "Host: X.\r\nX-Forwarded-Proto: gopher",
    ],
)
async def test_headers_cannot_move_the_destination(
    start_gateway: GatewayFactory, upstream: Upstream, canary: Canary, headers: str
) -> None:
    gw = await start_gateway(**route_to(upstream))
    text = headers.format(canary=canary.port)
    answer = await raw_request(
        gw.gateway.ports["listen"], f"GET /v1/x HTTP/1.1\r\n{text}\r\nConnection: close\r\n\r\n".encode(), 1
    )
    assert status_and_body(answer)[0] == 200
    assert headers_of(upstream.recorder.requests[-1].headers)["host"] == [f"127.0.0.1:{upstream.port}"]
    assert canary.accepts == []


@pytest.mark.parametrize(
    "request_line",
    [
        "GET http://127.0.0.1:{canary}/x HTTP/1.1",
        "GET http://localhost:{canary}/x HTTP/1.1",
        "GET http://2130706433:{canary}/x HTTP/1.1",
        "GET http://[::ffff:127.0.0.1]:{canary}/x HTTP/1.1",
        "CONNECT 127.0.0.1:{canary} HTTP/1.1",
        "CONNECT localhost:{canary} HTTP/1.1",
    ],
)
async def test_absolute_uris_and_connect_to_unlisted_hosts_are_403(
    start_gateway: GatewayFactory, upstream: Upstream, canary: Canary, request_line: str
) -> None:
    gw = await start_gateway(**route_to(upstream))
    line = request_line.format(canary=canary.port)
    answer = await raw_request(
        gw.gateway.ports["listen"], f"{line}\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), 1
    )
    status, body = status_and_body(answer)
    assert status in (400, 403)
    assert json.loads(body)["error"]["code"] in ("egress_denied", "bad_request")
    await asyncio.sleep(0.05)
    assert canary.accepts == []
    assert upstream.recorder.requests == []


async def test_the_connector_itself_refuses_unlisted_hosts(canary: Canary) -> None:
    """Even a direct call on the gateway's client session (no handler involved) cannot reach the canary."""
    config = GatewayConfig.model_validate({"allowlist": ["www.braintrust.dev"]})
    guard = EgressGuard(Allowlist.parse(config.allowlist))
    session = build_session(config, guard, EgressResolver(guard, {"www.braintrust.dev": "127.0.0.1"}))
    try:
        for url in (f"http://127.0.0.1:{canary.port}/", f"http://localhost:{canary.port}/"):
            with pytest.raises(GatewayFailure) as info:
                await session.get(url)
            assert info.value.error.code is Code.EGRESS_DENIED
    finally:
        await session.close()
    assert canary.accepts == []
