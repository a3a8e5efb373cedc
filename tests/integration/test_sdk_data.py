"""No SDK data lost or altered through the gateway: the real Python SDK (0.47.0) against the fake.

Large batches go to the object store through the signed-URL relay, a burst of uploads over the data
route's limit is shaped (delayed) instead of refused, and a row's text comes back as it was written.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import STORE, GatewayFactory, Logs, RunningGateway
from tests.fake_braintrust import FakeBraintrust
from tests.sdk_flow import run_flow

pytestmark = pytest.mark.sdk

API_KEY = "sk-sdk-data-test-key-0123456789"
SECRET = "relay-secret-for-tests-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def sdk(flow: str, gw: RunningGateway, *args: str) -> Any:
    return await run_flow(flow, gw.url, API_KEY, {"BRAINTRUST_APP_URL": gw.url}, *args)


def assert_all_through_the_gateway(fake: FakeBraintrust) -> None:
    """Every request any fake server saw came through the gateway and was one it understands."""
    for plane in (fake.control, fake.data, fake.objects):
        for request in plane.requests:
            assert "1.1 bt-gateway" in request.headers.get("Via", ""), f"{request.path} reached {plane.name}"
        assert plane.failures() == [], [(r.method, r.path, r.status) for r in plane.failures()]


@pytest.mark.parametrize("method", ["PUT", "POST"])  # S3's presigned PUT URL, or its POST form
async def test_a_batch_over_the_limit_reaches_the_store_through_the_relay(
    start_gateway: GatewayFactory,
    sdk_env: None,
    logs: Logs,
    method: str,
    store_tls: ssl.SSLContext,
    ca_file: Path,
) -> None:
    async with FakeBraintrust(
        api_key=API_KEY,
        logs3_payload_max_bytes=64 * 1024,
        store_host=STORE,
        upload_method=method,
        store_tls=store_tls,
    ) as fake:
        store = f"{STORE}:{fake.store_port}"
        gw = await start_gateway(
            **fake.gateway_config(store, rate_limit="off"),
            relay={"allow_hosts": [store], "secret": SECRET},
            upstream={"ca_bundle": str(ca_file)},
        )
        out = await sdk("large_batch", gw)
        experiment = fake.store.experiment_named("big")
        assert experiment is not None
        rows = fake.store.rows_of("experiment", experiment["id"])

    # Each big row went to the store by signed PUT and /logs3 named its key; every row arrived whole.
    assert out["overflow_uploads"] == 3
    assert sorted((r["input"], r["output"]) for r in rows) == [
        ("big-0", "x" * 96 * 1024),
        ("big-1", "x" * 96 * 1024),
        ("big-2", "x" * 96 * 1024),
        ("small", "y"),
    ]
    # The store verified its own signature on every upload, and each came through the gateway.
    status = {"PUT": 200, "POST": 204}[method]
    assert [(r.method, r.status) for r in fake.objects.requests] == [(method, status)] * 3
    assert_all_through_the_gateway(fake)
    relayed = [e for e in logs.named("access") if e["path"].startswith("/_relay/")]
    assert [(e["method"], e["route"], e["status"], e["upstream_host"]) for e in relayed] == [
        (method, "data", status, STORE)
    ] * 3
    assert all(len(e["path"]) == len("/_relay/") + 12 for e in relayed)  # a fingerprint, not the link


async def code_of(resp: aiohttp.ClientResponse) -> str:
    body = await resp.json()
    return str(body["error"]["code"])


async def relay_link(gw: RunningGateway) -> str:
    """An upload slot asked for through the gateway, as the SDK asks: its signedUrl is a relay link."""
    async with aiohttp.ClientSession(headers=AUTH) as client:
        async with client.post(gw.url + "/data-plane/logs3/overflow", json={"size_bytes": 1}) as resp:
            assert resp.status == 200
            slot = await resp.json()
    link: str = slot["signedUrl"]
    assert link.startswith(gw.url + "/_relay/")
    return link


async def test_a_forged_or_altered_relay_link_is_denied_without_a_connection(
    start_gateway: GatewayFactory, store_tls: ssl.SSLContext, ca_file: Path
) -> None:
    async with FakeBraintrust(api_key=API_KEY, store_host=STORE, store_tls=store_tls) as fake:
        store = f"{STORE}:{fake.store_port}"
        gw = await start_gateway(
            **fake.gateway_config(store),
            relay={"allow_hosts": [store], "secret": SECRET},
            upstream={"ca_bundle": str(ca_file)},
        )
        link = await relay_link(gw)
        payload, _, mac = link.removeprefix(gw.url + "/_relay/").partition(".")
        forged_mac = ("A" if mac[0] != "A" else "B") + mac[1:]
        denied = [
            f"{gw.url}/_relay/{payload}.{forged_mac}",  # a MAC it did not make
            f"{gw.url}/_relay/{payload[:-2]}.{mac}",  # a payload it did not sign
            f"{gw.url}/_relay/{payload}",  # no MAC at all
        ]
        async with aiohttp.ClientSession() as client:
            for url in denied:
                async with client.put(url, data=b"{}") as resp:
                    assert (resp.status, await code_of(resp)) == (403, "relay_denied"), url
            async with client.get(link) as resp:  # an upload link does not download
                assert (resp.status, await code_of(resp)) == (403, "relay_denied")
            assert fake.objects.requests == []  # no refused link made a connection
            async with client.put(link, data=b'{"rows": []}') as resp:
                assert resp.status == 200
    assert [(r.method, r.status) for r in fake.objects.requests] == [("PUT", 200)]


async def test_a_relay_link_obeys_the_allow_list(
    start_gateway: GatewayFactory, store_tls: ssl.SSLContext
) -> None:
    """Listing a store in relay.allow_hosts alone does not open it: the allow-list has the last word."""
    async with FakeBraintrust(api_key=API_KEY, store_host=STORE, store_tls=store_tls) as fake:
        store = f"{STORE}:{fake.store_port}"
        gw = await start_gateway(**fake.gateway_config(), relay={"allow_hosts": [store], "secret": SECRET})
        link = await relay_link(gw)
        async with aiohttp.ClientSession() as client, client.put(link, data=b"{}") as resp:
            assert (resp.status, await code_of(resp)) == (403, "egress_denied")
    assert fake.objects.requests == []


async def test_uploads_over_the_data_routes_limit_wait_and_all_arrive(
    start_gateway: GatewayFactory, sdk_env: None, logs: Logs
) -> None:
    async with FakeBraintrust(api_key=API_KEY) as fake:
        shaped = {"max_requests": 5, "window_minutes": 0.05, "on_limit": "delay"}  # 5 per 3 s
        gw = await start_gateway(**fake.gateway_config(rate_limit=shaped), rate_limit={"max_requests": 1000})
        await sdk("rows_one_by_one", gw)
        experiment = fake.store.experiment_named("burst")
        assert experiment is not None
        rows = fake.store.rows_of("experiment", experiment["id"])

    assert sorted(r["input"] for r in rows) == list(range(30))
    data = [e for e in logs.named("access") if e["route"] == "data"]
    assert len(data) > 5  # more requests than the window allows...
    assert [e["status"] for e in data] == [200] * len(data)  # ...and none refused
    assert any("ratelimit:delayed" in e["decisions"] for e in data)  # some waited for a slot
    assert_all_through_the_gateway(fake)


async def test_user_data_comes_back_byte_identical_while_the_login_is_rewritten(
    start_gateway: GatewayFactory, sdk_env: None
) -> None:
    async with FakeBraintrust(api_key=API_KEY) as fake:
        gw = await start_gateway(**fake.gateway_config(rate_limit="off"), public_url="https://public.example")
        text = f"GET {fake.data_url}/v1/x failed; see {fake.control_url}/app/acme and {gw.url}/data-plane"
        out = await sdk("round_trip_text", gw, text)
        dataset = fake.store.dataset_named("urls")
        assert dataset is not None
        fetch = f"/v1/dataset/{dataset['id']}/fetch"
        async with aiohttp.ClientSession(headers=AUTH) as client:
            async with client.post(gw.url + "/data-plane" + fetch, json={"limit": 10}) as via_gateway:
                through = await via_gateway.read()
            async with client.post(fake.data_url + fetch, json={"limit": 10}) as direct_resp:
                direct = await direct_resp.read()
            async with client.post(gw.url + "/api/apikey/login") as login:
                (org,) = (await login.json())["org_info"]

    assert out["fetched"] == [[text, {"note": text}]]  # what the SDK read is what it wrote
    assert through == direct  # byte for byte, URLs and all
    assert text in json.loads(through)["events"][0]["input"]
    assert org["api_url"] == org["proxy_url"] == gw.url + "/data-plane"  # the login is still rewritten


async def test_relay_transfers_count_in_the_issuing_routes_limit(
    start_gateway: GatewayFactory, store_tls: ssl.SSLContext, ca_file: Path
) -> None:
    """A relay link is limited like its route, in the bucket of the token it was handed to."""
    async with FakeBraintrust(api_key=API_KEY, store_host=STORE, store_tls=store_tls) as fake:
        store = f"{STORE}:{fake.store_port}"
        gw = await start_gateway(
            **fake.gateway_config(store, rate_limit={"max_requests": 2}),
            relay={"allow_hosts": [store], "secret": SECRET},
            upstream={"ca_bundle": str(ca_file)},
        )
        link = await relay_link(gw)
        async with aiohttp.ClientSession() as client:
            statuses = []
            for _ in range(3):
                async with client.put(link, data=b"{}") as resp:
                    statuses.append(resp.status)
    assert statuses == [200, 429, 429]  # the link's request took one of the key's 2
    assert len(fake.objects.requests) == 1
