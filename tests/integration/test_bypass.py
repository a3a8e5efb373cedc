"""No silent bypass: every way around the gateway it can see is logged once per host, counted, and says
what to configure; the one it refuses (a tunnel to a rate-limited host) says so where the user looks."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import requests

from tests.clients import curl, scrape, value
from tests.conftest import (
    NAME,
    GatewayFactory,
    Logs,
    NamedUpstream,
    RawUpstream,
    RunningGateway,
    json_reply,
)
from tests.fake_braintrust import FakeBraintrust
from tests.gateway_process import GatewayProcess
from tests.integration.test_quotas import limited_tls_config
from tests.sdk_flow import run_in_subprocess

API_KEY = "sk-bypass-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
STORE = "127.0.0.3"
WAY_IN = "Use BRAINTRUST_APP_URL=http://gw.corp.example:8080"


async def bypasses(admin_url: str, event: str) -> float:
    return value(await scrape(admin_url), "bt_gateway_bypass_total", event=event)


async def login(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as client:
        async with client.post(url + "/api/apikey/login", headers=AUTH) as resp:
            assert resp.status == 200
            org: dict[str, Any] = (await resp.json())["org_info"][0]
            return org


async def test_a_refused_tunnel_says_what_to_set_in_the_status_line_requests_and_curl_show(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, logs: Logs
) -> None:
    gw = await start_gateway(**limited_tls_config(named_tls, tunnel_to_limited_hosts="deny"))
    target = f"https://{NAME}:{named_tls.port}/v1/project"

    def through_requests() -> str:
        with pytest.raises(requests.exceptions.ProxyError) as refused:
            requests.get(target, proxies={"https": gw.url}, timeout=15)
        return str(refused.value)

    assert f"Tunnel connection failed: 403 {WAY_IN}" in await asyncio.to_thread(through_requests)
    code, _, shown = await curl("-v", "--proxy", gw.url, target)
    assert code != 0 and f"< HTTP/1.1 403 {WAY_IN}\r\n" in shown
    assert named_tls.recorder.started == []
    accesses = [a for a in logs.named("access") if a["path"] == f"{NAME}:{named_tls.port}"]
    assert [(a["error_code"], a["reason"]) for a in accesses] == [
        ("use_reverse_mode", "use_reverse_mode")
    ] * 2
    [warning] = logs.named("use_reverse_mode")  # two refusals, one warning for the host
    assert warning["host"] == NAME and "BRAINTRUST_APP_URL=http://gw.corp.example:8080" in warning["detail"]
    assert await bypasses(gw.admin_url, "use_reverse_mode") == 2


async def test_a_login_naming_a_data_plane_no_route_serves_is_said_once_with_the_config_to_add(
    start_gateway: GatewayFactory, logs: Logs
) -> None:
    async with FakeBraintrust(api_key=API_KEY) as fake:
        routed = await start_gateway(**fake.gateway_config())
        assert (await login(routed.url))["api_url"] == routed.url + "/data-plane"  # nothing to say
        config = fake.gateway_config()
        config["routes"] = config["routes"][:1]  # the app route only: nothing advertises the data plane
        gw = await start_gateway(**config)
        for _ in range(2):
            data_url = fake.data_url
            assert (await login(gw.url))["api_url"] == data_url  # the SDK would go straight there
    [warning] = logs.named("data_plane_not_routed")
    assert warning["host"] == "127.0.0.1"
    assert warning["detail"].startswith(f"route it through the gateway: BT_GATEWAY_DATA_PLANE_URL={data_url}")
    assert await bypasses(gw.admin_url, "data_plane_not_routed") == 2
    assert await bypasses(routed.admin_url, "data_plane_not_routed") == 0
    logins = [a for a in logs.named("access") if a["path"] == "/api/apikey/login"]
    assert ["bypass:data_plane_not_routed" in a["decisions"] for a in logins] == [False, True, True]


@pytest.mark.sdk
async def test_an_env_only_deployment_keeps_a_self_hosted_data_plane_on_the_gateway(
    tmp_path: Any, sdk_env: None
) -> None:
    """No routes in the file: BRAINTRUST_APP_URL and BT_GATEWAY_DATA_PLANE_URL route both planes, and the
    real SDK's every data-plane call comes through the gateway."""
    async with FakeBraintrust(api_key=API_KEY) as fake:
        allow = f"127.0.0.1:{fake.control_port},127.0.0.1:{fake.data_port}"
        env = {
            "BRAINTRUST_APP_URL": fake.control_url,
            "BT_GATEWAY_DATA_PLANE_URL": fake.data_url,
            "BT_GATEWAY_ALLOWLIST": allow,
        }
        gw = GatewayProcess({}, tmp_path, env=env)
        try:
            result = await run_in_subprocess(gw.url, API_KEY, {"BRAINTRUST_APP_URL": gw.url})
        finally:
            gw.stop()
        assert result.api_url == gw.url + "/data-plane" and result.rows == [("a", "b"), ("c", "d")]
        assert fake.data.requests and [r.path for r in fake.data.requests if "Via" not in r.headers] == []
    assert gw.events("data_plane_not_routed") == []


async def test_without_the_data_plane_variable_an_env_only_login_says_which_to_set(tmp_path: Any) -> None:
    async with FakeBraintrust(api_key=API_KEY) as fake:
        allow = f"127.0.0.1:{fake.control_port}"  # the corporate control plane only: no data route
        env = {"BRAINTRUST_APP_URL": fake.control_url, "BT_GATEWAY_ALLOWLIST": allow}
        gw = GatewayProcess({}, tmp_path, env=env)
        try:
            data_url = fake.data_url
            assert (await login(gw.url))["api_url"] == data_url
            warning = await gw.event("data_plane_not_routed")
        finally:
            gw.stop()
    assert f"BT_GATEWAY_DATA_PLANE_URL={data_url}" in warning["detail"]


async def overflow_slot(gw: RunningGateway) -> dict[str, Any]:
    async with aiohttp.ClientSession() as client:
        async with client.post(gw.url + "/data-plane/logs3/overflow", headers=AUTH, json={}) as resp:
            assert resp.status == 200
            slot: dict[str, Any] = await resp.json()
            return slot


async def test_signed_urls_that_leave_unrelayed_are_said_with_or_without_a_relay(
    start_gateway: GatewayFactory, logs: Logs
) -> None:
    async with FakeBraintrust(api_key=API_KEY, store_host=STORE) as fake:
        store = f"{STORE}:{fake.store_port}"
        plain = await start_gateway(**fake.gateway_config(store))  # no relay section at all
        other = await start_gateway(  # a relay for another store
            **fake.gateway_config(store), relay={"allow_hosts": ["store.corp.example"]}
        )
        for gw in (plain, other, plain):
            assert (await overflow_slot(gw))["signedUrl"].startswith(f"http://{store}/")
    warnings = logs.named("relay_host_not_allowed")
    assert [w["host"] for w in warnings] == [STORE, STORE]  # once per host in each gateway process
    assert await bypasses(plain.admin_url, "relay_host_not_allowed") == 2
    assert await bypasses(other.admin_url, "relay_host_not_allowed") == 1


async def test_signed_urls_on_an_advertised_routes_own_body_paths_are_relayed_or_said(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, logs: Logs
) -> None:
    """Not only the SDKs' known endpoints: every JSON body on `body_paths` of an advertised route is a
    control document whose signed URLs are relayed (or, for a host not to relay, said)."""
    signed = {"relayed": "https://store.corp.example/k?sig=1", "direct": "https://other.example/k?sig=2"}
    for name, url in signed.items():
        raw_upstream.replies[f"/slots/{name}"] = json_reply({"signedUrl": url})
    host = raw_upstream.url.split("://")[1]
    gw = await start_gateway(
        allowlist=[host, "store.corp.example"],
        routes=[{"name": "data", "prefix": "/", "upstream": raw_upstream.url, "advertise": True}],
        rewrite={"body_paths": ["/slots/*"]},
        relay={"allow_hosts": ["store.corp.example"]},
    )
    async with aiohttp.ClientSession() as client:
        slots = {}
        for name in signed:
            async with client.get(f"{gw.url}/slots/{name}") as resp:
                slots[name] = (await resp.json())["signedUrl"]
    assert slots["relayed"].startswith(gw.url + "/_relay/")
    assert slots["direct"] == signed["direct"]
    assert [w["host"] for w in logs.named("relay_host_not_allowed")] == ["other.example"]
