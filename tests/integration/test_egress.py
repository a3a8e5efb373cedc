"""Egress: no request target, header, redirect or encoding makes the gateway connect to an unlisted host.

Each attack is sent as exact bytes (or with curl/requests, which are told not to normalise), and checked
three ways: what the client got, what the allow-listed upstream saw, and that the canary (a listener that
is never allow-listed) accepted no connection at all.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import requests

from gateway.config.load import ConfigError, load_config
from gateway.config.model import GatewayConfig
from gateway.errors import Code, GatewayFailure
from gateway.generation import Generation
from tests.clients import curl, curl_reply, get, send_raw
from tests.conftest import Canary, GatewayFactory, Upstream, route_to

MARKER = b"egress-test-marker"


async def canary_accepts(canary: Canary) -> list[bytes]:
    """Every connection the canary accepted, settled by a barrier instead of a sleep.

    The marker connection is queued behind any connection the gateway made while serving the request
    (that connect finished before the gateway answered), so once the marker is recorded, so is every
    earlier one.
    """
    _, writer = await asyncio.open_connection("127.0.0.1", canary.port)
    writer.write(MARKER)
    await writer.drain()
    writer.close()
    async with asyncio.timeout(10):
        while MARKER not in canary.accepts:
            await asyncio.sleep(0.001)
    canary.accepts.remove(MARKER)
    return canary.accepts


def host_seen(upstream: Upstream) -> list[str]:
    return [v for k, v in upstream.recorder.requests[-1].headers if k.lower() == "host"]


PATHS = [
    "//127.0.0.1:{c}/x",
    "/..//127.0.0.1:{c}/x",
    "/%2F%2F127.0.0.1:{c}",
    "/%2f%2f127.0.0.1:{c}/x",
    "/\\127.0.0.1:{c}/",
    "/\\\\127.0.0.1:{c}/",
    "/%5C%5C127.0.0.1:{c}/",
    "/@127.0.0.1:{c}/",
    "//user@127.0.0.1:{c}/x",
    "/.%2e/%2e%2e//127.0.0.1:{c}/x",
    "/http://127.0.0.1:{c}/x",
    "/?next=http://127.0.0.1:{c}/x",
]


@pytest.mark.parametrize("path", PATHS)
async def test_path_attacks_stay_on_the_route_upstream(
    start_gateway: GatewayFactory, upstream: Upstream, canary: Canary, path: str
) -> None:
    gw = await start_gateway(**route_to(upstream))
    raw = path.format(c=canary.port)
    reply = await get(gw.gateway.ports["listen"], raw)
    assert reply.status == 200
    assert [r.raw_path for r in upstream.recorder.requests] == [raw]  # byte for byte
    assert host_seen(upstream) == [f"127.0.0.1:{upstream.port}"]
    assert await canary_accepts(canary) == []


HEADERS = [
    "Host: 127.0.0.1:{c}",
    "Host: localhost:{c}",
    "Host: LOCALHOST:{c}",
    "Host: localhost.:{c}",
    "Host: 127.0.0.1.:{c}",
    "Host:\t127.0.0.1:{c}\t",
    "Host: gw\r\nX-Forwarded-Host: 127.0.0.1:{c}",
    "Host: gw\r\nX-Original-URL: http://127.0.0.1:{c}/x",
    "Host: gw\r\nX-Rewrite-URL: //127.0.0.1:{c}/x",
    "Host: gw\r\nForwarded: host=127.0.0.1:{c};proto=http",
    "Host: gw\r\nX-Host: 127.0.0.1:{c}\r\nX-HTTP-Host-Override: 127.0.0.1:{c}",
]


@pytest.mark.parametrize("headers", HEADERS)
async def test_headers_cannot_move_the_destination(
    start_gateway: GatewayFactory, upstream: Upstream, canary: Canary, headers: str
) -> None:
    gw = await start_gateway(**route_to(upstream))
    reply = await get(gw.gateway.ports["listen"], "/v1/x", headers.format(c=canary.port) + "\r\n")
    assert reply.status == 200
    assert [r.raw_path for r in upstream.recorder.requests] == ["/v1/x"]
    assert host_seen(upstream) == [f"127.0.0.1:{upstream.port}"]
    assert await canary_accepts(canary) == []


@pytest.mark.parametrize(
    "headers",
    [
        "Host: 127.0.0.1%00:{c}",
        "Host: 127.0.0.1:{c}/x",
        "Host: a@127.0.0.1:{c}",
        f"Host: {'a' * 250}.example:{{c}}",
        f"Host: {'.'.join(['a' * 60] * 5)}.example",  # valid labels, but 308 characters: it would size URLs
        "Host: gw\r\nX-Forwarded-Host: 127.0.0.1:{c}/x",
    ],
)
async def test_hosts_that_are_not_host_port_are_400_and_reach_nothing(
    start_gateway: GatewayFactory, upstream: Upstream, canary: Canary, headers: str
) -> None:
    gw = await start_gateway(**route_to(upstream))
    reply = await get(gw.gateway.ports["listen"], "/v1/x", headers.format(c=canary.port) + "\r\n")
    assert (reply.status, reply.code) == (400, "bad_host")
    assert upstream.recorder.requests == []
    assert await canary_accepts(canary) == []


@pytest.mark.parametrize(
    ("request_line", "status", "code"),
    [
        ("GET http://127.0.0.1:{c}/x HTTP/1.1", 403, "egress_denied"),
        ("GET HTTP://127.0.0.1:{c}/x HTTP/1.1", 403, "egress_denied"),
        ("GET http://localhost:{c}/x HTTP/1.1", 403, "egress_denied"),
        ("GET http://LOCALHOST.:{c}/x HTTP/1.1", 403, "egress_denied"),
        ("GET http://127.1:{c}/x HTTP/1.1", 403, "egress_denied"),
        ("GET http://2130706433:{c}/x HTTP/1.1", 403, "egress_denied"),
        ("GET http://[::ffff:127.0.0.1]:{c}/x HTTP/1.1", 403, "egress_denied"),
        ("GET http://127.0.0.1:{u}@127.0.0.1:{c}/x HTTP/1.1", 400, "bad_request"),
        ("GET http://127.0.0.1%00:{c}/x HTTP/1.1", 400, "bad_request"),
        ("CONNECT 127.0.0.1:{c} HTTP/1.1", 403, "egress_denied"),
        ("CONNECT localhost:{c} HTTP/1.1", 403, "egress_denied"),
        ("CONNECT [::1]:{c} HTTP/1.1", 403, "egress_denied"),
        ("CONNECT 127.0.0.1:{u}@127.0.0.1:{c} HTTP/1.1", 400, "bad_connect_target"),
    ],
)
async def test_absolute_form_and_connect_to_unlisted_hosts_are_refused(
    start_gateway: GatewayFactory,
    upstream: Upstream,
    canary: Canary,
    request_line: str,
    status: int,
    code: str,
) -> None:
    gw = await start_gateway(**route_to(upstream))
    line = request_line.format(c=canary.port, u=upstream.port)
    reply = await send_raw(gw.gateway.ports["listen"], f"{line}\r\nHost: gw\r\n\r\n".encode())
    assert (reply.status, reply.code) == (status, code)
    assert upstream.recorder.requests == []
    assert await canary_accepts(canary) == []


async def test_absolute_form_to_the_allowed_host_ignores_a_canary_host_header(
    start_gateway: GatewayFactory, upstream: Upstream, canary: Canary
) -> None:
    gw = await start_gateway(**route_to(upstream, forward_proxy={"http_ports": [upstream.port]}))
    target = f"http://127.0.0.1:{upstream.port}/v1/x"
    reply = await get(gw.gateway.ports["listen"], target, f"Host: 127.0.0.1:{canary.port}\r\n")
    assert reply.status == 200
    assert [r.raw_path for r in upstream.recorder.requests] == ["/v1/x"]
    assert host_seen(upstream) == [f"127.0.0.1:{upstream.port}"]
    assert await canary_accepts(canary) == []


@pytest.mark.parametrize("target", ["/redirect", "http://127.0.0.1:{u}/redirect"])
async def test_upstream_redirect_to_the_canary_is_relayed_not_followed(
    start_gateway: GatewayFactory, upstream: Upstream, canary: Canary, target: str
) -> None:
    gw = await start_gateway(**route_to(upstream, forward_proxy={"http_ports": [upstream.port]}))
    reply = await get(gw.gateway.ports["listen"], target.format(u=upstream.port))
    assert reply.status == 302
    assert reply.headers["location"] == f"http://127.0.0.1:{canary.port}/stolen"
    assert [r.raw_path for r in upstream.recorder.requests] == ["/redirect"]
    assert await canary_accepts(canary) == []


async def test_curl_attacks(start_gateway: GatewayFactory, upstream: Upstream, canary: Canary) -> None:
    gw = await start_gateway(**route_to(upstream))
    c = canary.port
    path = await curl_reply("--path-as-is", f"{gw.url}//127.0.0.1:{c}/../x", "-H", f"Host: 127.0.0.1:{c}")
    assert path.status == 200
    assert [r.raw_path for r in upstream.recorder.requests] == [f"//127.0.0.1:{c}/../x"]
    assert host_seen(upstream) == [f"127.0.0.1:{upstream.port}"]
    absolute = await curl_reply("--request-target", f"http://127.0.0.1:{c}/x", gw.url + "/")
    assert (absolute.status, absolute.code) == (403, "egress_denied")
    _, tunnel, _ = await curl(
        "-o", "/dev/null", "-w", "%{http_connect}", "-p", "-x", gw.url, f"https://127.0.0.1:{c}/"
    )
    assert tunnel == "403"
    redirect = await curl_reply(gw.url + "/redirect")  # no -L: curl itself must not follow
    assert redirect.status == 302
    assert redirect.headers["location"] == f"http://127.0.0.1:{c}/stolen"
    assert len(upstream.recorder.requests) == 2
    assert await canary_accepts(canary) == []


async def test_requests_attacks(start_gateway: GatewayFactory, upstream: Upstream, canary: Canary) -> None:
    gw = await start_gateway(**route_to(upstream))
    canary_url = f"http://127.0.0.1:{canary.port}/x"

    def run() -> list[requests.Response]:
        with requests.Session() as session:
            session.trust_env = False
            return [
                session.get(canary_url, proxies={"http": gw.url}),
                session.get(gw.url + "/v1/x", headers={"Host": f"127.0.0.1:{canary.port}"}),
                session.get(gw.url + "/redirect", allow_redirects=False),
            ]

    proxied, host, redirect = await asyncio.to_thread(run)
    assert (proxied.status_code, proxied.json()["error"]["code"]) == (403, "egress_denied")
    assert host.status_code == 200
    assert redirect.status_code == 302
    assert redirect.headers["Location"] == f"http://127.0.0.1:{canary.port}/stolen"
    assert [r.raw_path for r in upstream.recorder.requests] == ["/v1/x", "/redirect"]
    assert await canary_accepts(canary) == []


def test_a_route_to_an_unlisted_upstream_is_rejected_at_load(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "allowlist: [api.braintrust.dev, '127.0.0.1:8000']\n"
        "routes:\n"
        "  - {name: app, prefix: /, upstream: 'https://api.braintrust.dev'}\n"
        "  - {name: evil, prefix: /x, upstream: 'http://127.0.0.1:9000'}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems == [f"{path}:4: routes[1].upstream: host '127.0.0.1' is not on the allowlist"]


async def test_the_connector_itself_refuses_unlisted_hosts(upstream: Upstream, canary: Canary) -> None:
    """Direct calls on the gateway's own session, no handler involved: the connector is the check."""
    config = GatewayConfig.model_validate(
        route_to(
            upstream,
            allowlist=[f"127.0.0.1:{upstream.port}", "www.braintrust.dev:443"],
            resolve={"www.braintrust.dev": "127.0.0.1"},
        )
    )
    generation = await Generation.build(config)
    session = generation.session
    c = canary.port
    try:
        for url in (
            f"http://127.0.0.1:{c}/",  # an IP literal: aiohttp skips the resolver, so this is the connector
            f"http://localhost:{c}/",
            f"http://www.braintrust.dev:{c}/",  # listed name, resolves to 127.0.0.1, but not on this port
            f"http://[::ffff:127.0.0.1]:{c}/",
            f"{upstream.url}/redirect",  # redirects followed by aiohttp are checked too
        ):
            with pytest.raises(GatewayFailure) as info:
                await session.get(url, allow_redirects=True)
            assert info.value.error.code is Code.EGRESS_DENIED
        async with session.get(f"{upstream.url}/v1/ok") as allowed:  # the same session does connect
            assert allowed.status == 200
    finally:
        await generation.close()
    assert [r.raw_path for r in upstream.recorder.requests] == ["/redirect", "/v1/ok"]
    assert await canary_accepts(canary) == []
