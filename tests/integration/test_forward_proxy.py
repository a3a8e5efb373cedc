"""Forward-proxy mode with real clients (curl, requests, aiohttp): CONNECT, absolute-form, proxy auth.

Every target is a NAME (`api.braintrust.test`) pinned to 127.0.0.1 by the gateway's `resolve` map, so
clients ask the proxy for the name (curl, requests and aiohttp never resolve a proxied target themselves)
and no /etc/hosts entry is needed. Tunnel mechanics (idle, half-close, leaks, limits) and the real CLI's
log events live in `test_forward_proxy_tunnels.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from gateway.policy.proxyauth import ScryptHash, hash_password
from tests.clients import assert_error, basic, curl, raw_connect, read_reply, send_raw
from tests.conftest import NAME, Canary, GatewayFactory, Logs, NamedUpstream, Upstream
from tests.upstream_app import Recorder

PLAIN = "plain.braintrust.test"  # the plain upstream's name (absolute-form)
USER, PASSWORD = "alice", "pw-Zq8vN3-never-logged"
REALM = 'Basic realm="bt-gateway"'


def requests_get(url: str, proxies: dict[str, str], **kwargs: Any) -> requests.Response:
    """A blocking `requests` call with no environment proxies: run it with asyncio.to_thread."""
    with requests.Session() as session:
        session.trust_env = False
        return session.get(url, proxies=proxies, timeout=15, **kwargs)


async def settle(predicate: Callable[[], bool], within_s: float = 5.0) -> bool:
    """Poll `predicate` until it holds or `within_s` passes; return its last value."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within_s):
            while not predicate():
                await asyncio.sleep(0.02)
    return predicate()


def seen_headers(recorder: Recorder) -> dict[str, str]:
    return {name.lower(): value for name, value in recorder.requests[-1].headers}


def proxy_config(tls: NamedUpstream, *extra_allow: str, **forward_proxy: Any) -> dict[str, Any]:
    """Allow-list NAME (pinned to 127.0.0.1) and open CONNECT to the TLS upstream's port."""
    return {
        "allowlist": [NAME, *extra_allow],
        "resolve": {NAME: "127.0.0.1", PLAIN: "127.0.0.1"},
        "routes": [{"name": "app", "prefix": "/", "upstream": tls.url}],
        "forward_proxy": {"connect_ports": [tls.port], **forward_proxy},
    }


# --- CONNECT with real clients ------------------------------------------------------------------


async def test_curl_connect_tunnel_reaches_tls_upstream_by_name(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, ca_file: Path, canary: Canary
) -> None:
    gw = await start_gateway(**proxy_config(named_tls))
    code, out, err = await curl("-x", gw.url, "--cacert", str(ca_file), named_tls.url + "/hello?a=1")
    assert code == 0, err
    echo = json.loads(out)
    assert echo["method"] == "GET" and echo["raw_path"] == "/hello?a=1"
    assert dict(echo["headers"])["Host"] == f"{NAME}:{named_tls.port}"
    stats = gw.gateway.tunnels
    assert await settle(lambda: stats.active == 0)  # byte counts are added when the tunnel ends
    assert stats.opened == 1 and stats.refused == 0
    assert stats.bytes_up > 0 and stats.bytes_down > len(out)  # TLS records around the body
    assert canary.accepts == []


async def test_requests_through_connect(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, ca_file: Path
) -> None:
    gw = await start_gateway(**proxy_config(named_tls))
    resp = await asyncio.to_thread(
        requests_get, named_tls.url + "/v1/x", {"https": gw.url}, verify=str(ca_file)
    )
    assert resp.status_code == 200
    assert resp.json()["raw_path"] == "/v1/x"
    assert named_tls.recorder.requests[-1].raw_path == "/v1/x"
    assert gw.gateway.tunnels.opened == 1


async def test_aiohttp_through_connect(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, ca_file: Path
) -> None:
    gw = await start_gateway(**proxy_config(named_tls))
    context = ssl.create_default_context(cafile=str(ca_file))
    async with aiohttp.ClientSession(trust_env=False) as client:
        for _ in range(2):
            async with client.post(
                named_tls.url + "/v1/upload", data=b"z" * 200_000, proxy=gw.url, ssl=context
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["body_bytes"] == 200_000
    assert named_tls.recorder.requests[-1].body_bytes == 200_000
    assert gw.gateway.tunnels.opened >= 1


# --- refusals: nothing is connected ---------------------------------------------------------------


async def test_denied_connect_targets_get_403_and_connect_nothing(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, canary: Canary, logs: Logs
) -> None:
    config = proxy_config(named_tls)
    config["forward_proxy"]["connect_ports"] = [named_tls.port, canary.port]
    gw = await start_gateway(**config)
    port = gw.gateway.ports["listen"]
    targets = [f"127.0.0.1:{canary.port}", f"localhost:{canary.port}", f"evil.test:{canary.port}"]
    async with raw_connect(port, targets[0]) as (answer, reader, writer):
        assert_error(answer, 403, "egress_denied")
        for target in targets[1:]:  # a refused CONNECT leaves the connection usable (curl retries on it)
            writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            assert_error(await read_reply(reader), 403, "egress_denied")
    assert canary.accepts == []
    assert gw.gateway.tunnels.refused == 3 and gw.gateway.tunnels.opened == 0
    for target in targets:
        assert (await logs.access(target))["reason"] == "host_not_allowed"


async def test_allowed_host_on_unlisted_port_gets_403(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, canary: Canary, logs: Logs
) -> None:
    gw = await start_gateway(**proxy_config(named_tls))  # NAME resolves to 127.0.0.1, like the canary
    async with raw_connect(gw.gateway.ports["listen"], f"{NAME}:{canary.port}") as (answer, _, _):
        assert_error(answer, 403, "egress_denied")
    assert canary.accepts == []
    assert (await logs.access(f"{NAME}:{canary.port}"))["reason"] == "port_not_allowed"


@pytest.mark.parametrize(
    "target",
    [
        "evil.com",
        ":443",
        "braintrust.dev:443@evil.com:443",
        f"{NAME}:443@127.0.0.1:443",
        "::1:443",
        f"{NAME}:0",
        f"{NAME}:443/x",
    ],
)
async def test_malformed_connect_target_is_400(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, canary: Canary, target: str
) -> None:
    gw = await start_gateway(**proxy_config(named_tls))
    async with raw_connect(gw.gateway.ports["listen"], target) as (answer, _, _):
        assert answer.status == 400
        assert answer.json()["error"]["code"] in ("bad_connect_target", "bad_request")
    assert canary.accepts == []


@pytest.mark.parametrize("target", ["evil.com", "braintrust.dev:443@evil.com:443", f"{NAME}:0"])
async def test_malformed_target_reaching_the_gateway_says_bad_connect_target(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, target: str, logs: Logs
) -> None:
    gw = await start_gateway(**proxy_config(named_tls))
    async with raw_connect(gw.gateway.ports["listen"], target) as (answer, _, _):
        assert_error(answer, 400, "bad_connect_target")
    assert (await logs.access(target))["reason"] == "malformed_target"


@pytest.mark.parametrize("target", ["::1:443", ":443", f"{NAME}:443/x"])
async def test_target_the_http_parser_rejects_says_bad_connect_target(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, target: str
) -> None:
    gw = await start_gateway(**proxy_config(named_tls))
    async with raw_connect(gw.gateway.ports["listen"], target) as (answer, _, _):
        assert_error(answer, 400, "bad_connect_target")


async def test_connect_when_forward_proxy_disabled_is_refused(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, canary: Canary
) -> None:
    config = proxy_config(named_tls, f"127.0.0.1:{canary.port}")
    config["forward_proxy"]["enabled"] = False
    gw = await start_gateway(**config)
    async with raw_connect(gw.gateway.ports["listen"], f"127.0.0.1:{canary.port}") as (answer, _, _):
        assert_error(answer, 405, "method_not_allowed")
    assert canary.accepts == []


# --- absolute-form ---------------------------------------------------------------------------------


def absolute_config(upstream: Upstream, **forward_proxy: Any) -> dict[str, Any]:
    plain = f"http://{PLAIN}:{upstream.port}"
    return {
        "allowlist": [f"{PLAIN}:{upstream.port}"],
        "resolve": {PLAIN: "127.0.0.1"},
        "routes": [{"name": "app", "prefix": "/", "upstream": plain}],
        "forward_proxy": {"http_ports": [upstream.port], **forward_proxy},
    }


async def test_absolute_form_with_requests_reaches_upstream_with_uri_host(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**absolute_config(upstream))
    url = f"http://{PLAIN}:{upstream.port}/x?q=%2F&r"
    resp = await asyncio.to_thread(requests_get, url, {"http": gw.url})
    assert resp.status_code == 200
    seen = upstream.recorder.requests[-1]
    assert seen.raw_path == "/x?q=%2F&r"
    headers = seen_headers(upstream.recorder)
    assert headers["host"] == f"{PLAIN}:{upstream.port}"
    assert "proxy-connection" not in headers
    assert gw.gateway.tunnels.opened == 0


async def test_absolute_form_is_judged_and_forwarded_by_the_uri_not_the_host_header(
    start_gateway: GatewayFactory, upstream: Upstream, canary: Canary
) -> None:
    gw = await start_gateway(**absolute_config(upstream))
    port = gw.gateway.ports["listen"]
    answer = await send_raw(
        port,
        f"GET http://{PLAIN}:{upstream.port}/y?a=%41 HTTP/1.1\r\nHost: 127.0.0.1:{canary.port}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert answer.status == 200
    assert upstream.recorder.requests[-1].raw_path == "/y?a=%41"  # byte for byte
    assert seen_headers(upstream.recorder)["host"] == f"{PLAIN}:{upstream.port}"
    # The other way round: an allowed Host header does not let a denied URI through.
    answer = await send_raw(
        port,
        f"GET http://127.0.0.1:{canary.port}/z HTTP/1.1\r\nHost: {PLAIN}:{upstream.port}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert_error(answer, 403, "egress_denied")
    assert len(upstream.recorder.requests) == 1
    assert canary.accepts == []


async def test_absolute_form_to_unlisted_host_is_403(
    start_gateway: GatewayFactory, upstream: Upstream, canary: Canary
) -> None:
    gw = await start_gateway(**absolute_config(upstream))
    resp = await asyncio.to_thread(requests_get, f"http://evil.test:{canary.port}/x", {"http": gw.url})
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "egress_denied"
    # Listed name, other port: the allow-list entry carries a port.
    resp = await asyncio.to_thread(requests_get, f"http://{PLAIN}:{canary.port}/x", {"http": gw.url})
    assert resp.status_code == 403
    assert upstream.recorder.requests == []
    assert canary.accepts == []


# --- proxy authentication --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def user_hash() -> str:
    return hash_password(PASSWORD, log2_n=10)


async def test_password_checks_run_off_the_event_loop(
    start_gateway: GatewayFactory,
    named_tls: NamedUpstream,
    upstream: Upstream,
    user_hash: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While guesses are being verified (held here until the end), every other request is served."""
    entered, release, held_too_long = threading.Semaphore(0), threading.Event(), []
    real = ScryptHash.verify

    def held_verify(stored: ScryptHash, password: str) -> bool:
        entered.release()
        if not release.wait(5):  # on the event loop this would freeze the plain request below
            held_too_long.append(password)
        return real(stored, password)

    monkeypatch.setattr(ScryptHash, "verify", held_verify)
    config = proxy_config(named_tls, f"127.0.0.1:{upstream.port}", auth={"users": {USER: user_hash}})
    config["routes"] = [{"name": "app", "prefix": "/", "upstream": upstream.url}]
    gw = await start_gateway(**config)
    port = gw.gateway.ports["listen"]
    guesses = [
        asyncio.ensure_future(
            send_raw(
                port,
                f"CONNECT {NAME}:{named_tls.port} HTTP/1.1\r\nHost: {NAME}\r\n"
                f"Proxy-Authorization: {basic(USER, f'guess-{i}')}\r\n\r\n".encode(),
            )
        )
        for i in range(4)
    ]
    assert await asyncio.to_thread(entered.acquire, True, 10)  # a check is under way
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/plain") as resp:
        assert resp.status == 200
    release.set()
    assert [reply.status for reply in await asyncio.gather(*guesses)] == [407] * 4
    assert held_too_long == []


async def test_failed_proxy_logins_per_address_are_limited(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, user_hash: str
) -> None:
    auth = {"users": {USER: user_hash}, "max_failures_per_minute": 2}
    gw = await start_gateway(**proxy_config(named_tls, auth=auth))
    port = gw.gateway.ports["listen"]
    target = f"{NAME}:{named_tls.port}"
    for _ in range(2):
        async with raw_connect(port, target, f"Proxy-Authorization: {basic(USER, 'guess')}\r\n") as (a, _, _):
            assert_error(a, 407, "proxy_auth_required")
    # Over the limit even the right password is refused, and no scrypt is spent on it.
    async with raw_connect(port, target, f"Proxy-Authorization: {basic(USER, PASSWORD)}\r\n") as (a, _, _):
        assert_error(a, 429, "too_many_auth_failures")
        assert 1 <= int(a.headers["Retry-After"]) <= 60
    assert gw.gateway.tunnels.opened == 0


async def test_proxy_auth_required_for_connect_and_absolute_form(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, upstream: Upstream, user_hash: str
) -> None:
    config = proxy_config(
        named_tls, f"{PLAIN}:{upstream.port}", auth={"users": {USER: user_hash}}, http_ports=[upstream.port]
    )
    gw = await start_gateway(**config)
    port = gw.gateway.ports["listen"]
    for headers in ("", f"Proxy-Authorization: {basic(USER, 'wrong')}\r\n", "Proxy-Authorization: x\r\n"):
        async with raw_connect(port, f"{NAME}:{named_tls.port}", headers) as (answer, _, _):
            assert_error(answer, 407, "proxy_auth_required")
            assert answer.headers["proxy-authenticate"] == REALM
    answer = await send_raw(
        port, f"GET http://{PLAIN}:{upstream.port}/x HTTP/1.1\r\nHost: {PLAIN}\r\n\r\n".encode()
    )
    assert_error(answer, 407, "proxy_auth_required")
    assert answer.headers["proxy-authenticate"] == REALM
    assert upstream.recorder.requests == [] and named_tls.recorder.requests == []
    assert gw.gateway.tunnels.opened == 0
    async with raw_connect(
        port, f"{NAME}:{named_tls.port}", f"Proxy-Authorization: {basic(USER, PASSWORD)}\r\n"
    ) as (answer, _, _):
        assert answer.status == 200


async def test_proxy_auth_with_real_clients_and_never_forwarded(
    start_gateway: GatewayFactory,
    named_tls: NamedUpstream,
    upstream: Upstream,
    ca_file: Path,
    user_hash: str,
) -> None:
    config = proxy_config(
        named_tls, f"{PLAIN}:{upstream.port}", auth={"users": {USER: user_hash}}, http_ports=[upstream.port]
    )
    gw = await start_gateway(**config)
    authed = gw.url.replace("http://", f"http://{USER}:{PASSWORD}@")

    code, out, err = await curl(
        "-x", gw.url, "-U", f"{USER}:{PASSWORD}", "--cacert", str(ca_file), named_tls.url + "/c"
    )
    assert code == 0, err
    assert json.loads(out)["raw_path"] == "/c"
    code, _, err = await curl("-x", gw.url, "--cacert", str(ca_file), named_tls.url + "/c")
    assert code != 0 and "407" in err

    resp = await asyncio.to_thread(requests_get, named_tls.url + "/r", {"https": authed}, verify=str(ca_file))
    assert resp.status_code == 200
    resp = await asyncio.to_thread(requests_get, f"http://{PLAIN}:{upstream.port}/a", {"http": authed})
    assert resp.status_code == 200
    assert seen_headers(upstream.recorder)["host"] == f"{PLAIN}:{upstream.port}"

    async with aiohttp.ClientSession(trust_env=False) as client:
        async with client.get(
            f"http://{PLAIN}:{upstream.port}/b",
            proxy=gw.url,
            headers={"Proxy-Authorization": basic(USER, PASSWORD)},  # absolute-form: sent to the proxy
        ) as aresp:
            assert aresp.status == 200
        async with client.get(f"http://{PLAIN}:{upstream.port}/b", proxy=gw.url) as aresp:
            assert aresp.status == 407
            assert aresp.headers["Proxy-Authenticate"] == REALM

    for recorder in (upstream.recorder, named_tls.recorder):
        assert recorder.requests
        for seen in recorder.requests:
            names = {name.lower() for name, _ in seen.headers}
            assert "proxy-authorization" not in names
            assert all(PASSWORD not in value for _, value in seen.headers)
    assert gw.gateway.tunnels.opened == 2


async def test_deny_private_refuses_plain_http_to_a_name_resolving_to_loopback(
    start_gateway: GatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    """Checked where the connection is made, as for tunnels: an allow-listed name is not enough."""
    config = absolute_config(upstream, deny_private_addresses=True)
    config["routes"] = [{"name": "app", "prefix": "/", "upstream": "https://www.braintrust.dev"}]
    config["allowlist"] = [*config["allowlist"], "www.braintrust.dev"]
    gw = await start_gateway(**config)
    target = f"http://{PLAIN}:{upstream.port}/private"
    answer = await send_raw(
        gw.gateway.ports["listen"],
        f"GET {target} HTTP/1.1\r\nHost: {PLAIN}:{upstream.port}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert_error(answer, 403, "egress_denied")
    assert "127.0.0.1" not in answer.json()["error"]["message"]
    assert upstream.recorder.requests == []
    [event] = [e for e in logs.named("access") if e["status"] == 403]
    assert (event["reason"], event["upstream_address"]) == ("private_address", "127.0.0.1")
