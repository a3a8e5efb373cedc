"""The admin listener's access rules through the real gateway: the token, DNS rebinding, cross-site posts.

A non-loopback listener is bound to 0.0.0.0 and asked on 127.0.0.1. Whether a POST /reload got through
is read from `bt_gateway_config_reloads_total`: every reload attempt counts, a success or a failure.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.clients import curl, free_port, run_cli, scrape, value
from tests.conftest import GatewayFactory, RunningGateway
from tests.gateway_process import GatewayProcess

TOKEN = "admin-token-0123456789abcdef"
WARNING = (
    "admin.host 0.0.0.0 is not loopback and no admin.token is set: POST /reload answers 403 (SIGHUP and "
    "serve --watch still reload); set admin.token (env BT_GATEWAY_ADMIN_TOKEN) or admin.token_file to "
    "enable it"
)
OPEN_ADMIN = {"host": "0.0.0.0", "port": 0}


async def reloads(admin_url: str) -> float:
    """Reload attempts so far, successes and failures together."""
    samples = await scrape(admin_url)
    return sum(value(samples, "bt_gateway_config_reloads_total", result=r) for r in ("success", "failure"))


async def post(url: str, headers: dict[str, str] | None = None, data: Any = None) -> tuple[int, Any, Any]:
    """(status, JSON body, response headers) of a POST."""
    async with aiohttp.ClientSession() as client, client.post(url, headers=headers, data=data) as resp:
        return resp.status, await resp.json(), resp.headers


def assert_error(body: Any, code: str) -> None:
    assert body["error"]["code"] == code
    assert len(body["error"]["request_id"]) == 32


def no_token_in(gw: GatewayProcess) -> None:
    assert gw.raw_lines, "nothing was logged"
    assert [line for line in gw.raw_lines if TOKEN in line] == []


async def test_a_non_loopback_admin_listener_reloads_only_with_the_token(tmp_path: Path) -> None:
    env = {"BT_GATEWAY_ADMIN_TOKEN": TOKEN}
    gw = GatewayProcess({"admin": OPEN_ADMIN}, tmp_path, env=env)
    try:
        url = f"http://127.0.0.1:{gw.admin_port}"
        status, body, headers = await post(url + "/reload")
        assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="bt-gateway admin"'
        assert_error(body, "admin_token_invalid")
        assert body["error"]["request_id"] == headers["X-Request-Id"]
        status, body, _ = await post(url + "/reload", {"Authorization": f"Bearer {TOKEN}x"})
        assert status == 401
        assert_error(body, "admin_token_invalid")
        assert await reloads(url) == 0
        status, body, _ = await post(url + "/reload", {"Authorization": f"Bearer {TOKEN}"})
        assert (status, body) == (200, {"status": "reloaded", "config": str(gw.config_path)})
        assert await reloads(url) == 1
    finally:
        assert gw.stop() == 0  # every line is read once it has exited
    assert gw.events("admin_reload_disabled") == []
    assert [(e["code"], e["path"]) for e in gw.events("admin_refused")] == [
        ("admin_token_invalid", "/reload")
    ] * 2
    no_token_in(gw)


async def test_without_a_token_a_non_loopback_listener_refuses_reload_and_says_so(tmp_path: Path) -> None:
    gw = GatewayProcess({"admin": OPEN_ADMIN}, tmp_path)
    try:
        url = f"http://127.0.0.1:{gw.admin_port}"
        warning = await gw.event("admin_reload_disabled")
        assert (warning["key"], warning["detail"], warning["level"]) == ("admin.token", WARNING, "warning")
        status, body, _ = await post(url + "/reload")
        assert status == 403
        assert_error(body, "admin_token_not_set")
        assert body["error"]["message"] == (
            "this admin listener is not on loopback and admin.token is not set: POST /reload is disabled"
        )
        assert await reloads(url) == 0
        async with aiohttp.ClientSession() as client, client.get(url + "/readyz") as resp:
            assert resp.status == 200  # the probes and the scrape stay open
    finally:
        assert gw.stop() == 0


async def test_a_loopback_listener_without_a_token_still_reloads_with_curl(tmp_path: Path) -> None:
    gw = GatewayProcess({}, tmp_path)  # admin on 127.0.0.1, no token: as before
    try:
        url = f"http://127.0.0.1:{gw.admin_port}"
        code, out, err = await curl("-X", "POST", url + "/reload")
        assert code == 0, err
        assert json.loads(out) == {"status": "reloaded", "config": str(gw.config_path)}
    finally:
        assert gw.stop() == 0
    assert gw.events("admin_reload_disabled") == []


async def get(url: str, host: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as client, client.get(url, headers={"Host": host}) as resp:
        return resp.status, await resp.read()


@pytest.fixture
async def open_admin(start_gateway: GatewayFactory) -> RunningGateway:
    return await start_gateway(admin={**OPEN_ADMIN, "token": TOKEN})


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/status", "/status.json"])
async def test_probes_by_address_or_own_name_pass_and_a_rebinding_name_gets_403(
    open_admin: RunningGateway, path: str
) -> None:
    port = open_admin.gateway.ports["admin"]
    url = open_admin.admin_url + path
    for host in (f"10.244.1.17:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"localhost:{port}"):
        assert (await get(url, host))[0] == 200, host
    assert (await get(url, f"{socket.gethostname()}:{port}"))[0] == 200
    for host in (f"evil.example:{port}", "evil.example"):
        status, raw = await get(url, host)
        assert status == 403
        assert_error(json.loads(raw), "admin_host_denied")


async def test_a_rebinding_name_cannot_reload_even_with_the_token(open_admin: RunningGateway) -> None:
    headers = {"Host": "evil.example:9901", "Authorization": f"Bearer {TOKEN}"}
    status, body, _ = await post(open_admin.admin_url + "/reload", headers)
    assert status == 403
    assert_error(body, "admin_host_denied")
    assert await reloads(open_admin.admin_url) == 0


async def test_admin_allowed_hosts_names_a_service(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(admin={**OPEN_ADMIN, "allowed_hosts": ["bt-gateway-admin.egress.svc"]})
    assert (await get(gw.admin_url + "/metrics", "bt-gateway-admin.egress.svc:9901"))[0] == 200


CROSS_SITE = [
    ({"Origin": "https://evil.example"}, None),
    ({"Sec-Fetch-Site": "cross-site"}, None),
    ({}, aiohttp.FormData({"a": "1"})),  # application/x-www-form-urlencoded
    ({}, aiohttp.FormData({"a": "1"}, default_to_multipart=True)),
    ({"Content-Type": "text/plain"}, b"x"),
]


@pytest.mark.parametrize(
    ("headers", "data"), CROSS_SITE, ids=["origin", "fetch-site", "form", "multipart", "text"]
)
@pytest.mark.parametrize("token", [None, TOKEN], ids=["loopback-no-token", "loopback-token"])
async def test_a_cross_site_post_cannot_reload(
    start_gateway: GatewayFactory, headers: dict[str, str], data: Any, token: str | None
) -> None:
    gw = await start_gateway(admin={"host": "127.0.0.1", "port": 0, "token": token})
    auth = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    status, body, _ = await post(gw.admin_url + "/reload", {**auth, **headers}, data)
    assert status == 403
    assert_error(body, "cross_site_denied")
    assert await reloads(gw.admin_url) == 0
    status, _, _ = await post(gw.admin_url + "/reload", auth)  # the same request, as curl sends it
    assert status == 422  # reached the reloader (an in-process gateway has no file to reload from)
    assert await reloads(gw.admin_url) == 1


async def test_a_rotated_token_file_applies_at_the_next_reload(tmp_path: Path) -> None:
    """A Kubernetes Secret is a file that changes in place: the reload reads it and the new token rules."""
    secret, new = tmp_path / "token", "rotated-token-0123456789abcdef"
    secret.write_text(TOKEN + "\n")
    gw = GatewayProcess({"admin": {**OPEN_ADMIN, "token_file": str(secret)}}, tmp_path)
    try:
        url = f"http://127.0.0.1:{gw.admin_port}/reload"
        assert (await post(url, {"Authorization": f"Bearer {TOKEN}"}))[0] == 200
        secret.write_text(new + "\n")
        assert (await post(url, {"Authorization": f"Bearer {TOKEN}"}))[0] == 200  # re-reads the file
        status, body, _ = await post(url, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 401
        assert_error(body, "admin_token_invalid")
        assert (await post(url, {"Authorization": f"Bearer {new}"}))[0] == 200
    finally:
        assert gw.stop() == 0
    assert [line for line in gw.raw_lines if TOKEN in line or new in line] == []


async def test_the_container_health_check_passes_on_an_open_listener(tmp_path: Path) -> None:
    """`bt-gateway probe` asks at this host's own address: an IP literal in Host, so never a rebinding."""
    port = free_port()
    gw = GatewayProcess({"admin": {"host": "0.0.0.0", "port": port, "token": TOKEN}}, tmp_path)
    try:
        result = await asyncio.to_thread(run_cli, "probe", "--ready", "-c", str(gw.config_path))
        assert (result.returncode, result.stderr) == (0, "")
    finally:
        assert gw.stop() == 0
