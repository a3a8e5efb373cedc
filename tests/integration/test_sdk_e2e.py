"""The real braintrust SDK (0.47.0) through the gateway, against tests/fake_braintrust.py.

Reverse-proxy mode: BRAINTRUST_APP_URL is the gateway; the login response is rewritten so data-plane
calls come back through the gateway too. Forward-proxy mode: HTTPS_PROXY is the gateway and the planes
are TLS hosts only the gateway can resolve.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from yarl import URL

from tests.conftest import GatewayFactory
from tests.fake_braintrust import FakeBraintrust
from tests.sdk_flow import run_in_subprocess

PUBLIC = "https://public.example.com"
API_KEY = "sk-e2e-test-key-0123456789"


@pytest.fixture
async def planes() -> AsyncIterator[FakeBraintrust]:
    async with FakeBraintrust(api_key=API_KEY) as fake:
        yield fake


@pytest.fixture
def public_env(sdk_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK builds its links on the public URL, as a deployment would tell it."""
    monkeypatch.setenv("BRAINTRUST_APP_PUBLIC_URL", PUBLIC)


async def test_sdk_through_the_gateway_as_app_url(
    start_gateway: GatewayFactory, planes: FakeBraintrust, public_env: None
) -> None:
    gw = await start_gateway(public_url=PUBLIC, **planes.gateway_config(rate_limit="off"))
    result = await run_in_subprocess(gw.url, API_KEY, {"BRAINTRUST_APP_URL": gw.url})

    # The login response the SDK saw pointed the data plane back at the gateway.
    assert result.api_url == f"{gw.url}/data-plane"
    assert result.proxy_url == f"{gw.url}/data-plane"
    # The SDK's work really happened, on the fake planes, through the gateway.
    assert result.rows == [("a", "b"), ("c", "d")]
    assert result.scores == {"accuracy": 1.0}
    assert result.summary_url == f"{PUBLIC}/app/acme/p/proj/experiments/exp1"
    assert planes.control.paths() == ["/api/apikey/login"]
    data_paths = planes.data.paths()
    assert "/logs3" in data_paths and "/v1/experiment" in data_paths
    for plane in (planes.control, planes.data):
        for request in plane.requests:
            assert "1.1 bt-gateway" in request.headers.get("Via", ""), (
                f"{request.path} reached {plane.name} directly"
            )
        # Every call carried the key through the gateway and was one the fake understands.
        assert plane.failures() == [], [(r.method, r.path, r.status) for r in plane.failures()]
        assert {r.bearer for r in plane.requests} == {API_KEY}, plane.name

    # The permalink is built from the SDK's app URL (the gateway); a browser lands on public_url.
    assert result.permalink.startswith(f"{gw.url}/app/")
    async with aiohttp.ClientSession() as browser:
        link = URL(result.permalink, encoded=True)
        async with browser.get(link, headers={"Accept": "text/html"}, allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == PUBLIC + link.raw_path_qs


async def test_sdk_through_the_gateway_as_https_proxy(
    start_gateway: GatewayFactory,
    test_ca: trustme.CA,
    ca_file: Path,
    public_env: None,
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("cp.braintrust.test", "dp.braintrust.test").configure_cert(context)
    # Both planes listen on loopback but are named by hosts only the gateway's `resolve` map knows.
    async with FakeBraintrust(
        api_key=API_KEY,
        control_host="cp.braintrust.test",
        data_host="dp.braintrust.test",
        ssl_context=context,
    ) as found:
        gw = await start_gateway(
            allowlist=["cp.braintrust.test", "dp.braintrust.test"],
            resolve={"cp.braintrust.test": "127.0.0.1", "dp.braintrust.test": "127.0.0.1"},
            forward_proxy={"connect_ports": [found.control_port, found.data_port]},
            routes=[{"name": "app", "prefix": "/", "upstream": found.control_url}],
            upstream={"ca_bundle": str(ca_file)},
        )
        env = {
            "HTTPS_PROXY": gw.url,
            "REQUESTS_CA_BUNDLE": str(ca_file),
            "BRAINTRUST_APP_URL": found.control_url,
        }
        result = await run_in_subprocess(found.control_url, API_KEY, env)
        stats = gw.gateway.tunnels
        data_url = found.data_url
    # The names resolve nowhere but in the gateway's `resolve` map: the SDK can only have tunnelled.
    assert result.api_url == data_url
    assert result.rows == [("a", "b"), ("c", "d")]
    assert found.control.paths() == ["/api/apikey/login"]
    assert stats.opened >= 2 and stats.refused == 0
    for plane in (found.control, found.data):
        assert plane.failures() == [], [(r.method, r.path, r.status) for r in plane.failures()]
