"""`listen.tls`: the proxy listener speaks HTTPS, for every mode it serves, with real clients.

Reverse mode with the real Python and TypeScript SDKs (the login's `api_url` comes back `https://`), the
gateway as an `https://` proxy (TLS to the proxy, CONNECT inside it) with curl and requests, cleartext to
the TLS port, a certificate rotated on disk, and a client that never finishes its handshake. The
in-process gateway runs on asyncio's loop; `serve` (a subprocess) runs on uvloop, so both loops' TLS
transports are covered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from gateway.config.model import GatewayConfig
from tests.clients import curl
from tests.conftest import NAME, GatewayFactory, Logs, NamedUpstream, Upstream
from tests.fake_braintrust import FakeBraintrust
from tests.gateway_process import GatewayProcess
from tests.integration.test_forward_proxy import PLAIN, absolute_config, proxy_config, requests_get
from tests.integration.test_js_sdk import require_node, run_flow
from tests.sdk_flow import run_in_subprocess
from tests.tls_files import client_context, issue, leaf_pems, peer_serial, serial_of, tls_config, write_secret

API_KEY = "sk-tls-test-key-0123456789"
PUBLIC = "https://public.example.com"
HANG_GUARD_S = 15.0  # a bound on a broken test, never a timing assertion


@pytest.fixture
def secret(test_ca: trustme.CA, tmp_path: Path) -> tuple[Path, trustme.LeafCert]:
    """The gateway's certificate, mounted like a Secret: (its directory, the certificate)."""
    leaf = issue(test_ca)
    directory = tmp_path / "tls"
    write_secret(directory, "v1", *leaf_pems(leaf))
    return directory, leaf


@pytest.fixture
async def planes() -> AsyncIterator[FakeBraintrust]:
    async with FakeBraintrust(api_key=API_KEY) as fake:
        yield fake


def https_listener(directory: Path, **limits: Any) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": 0, "tls": tls_config(directory)},
        **({"limits": limits} if limits else {}),
    }


def https_url(port: int) -> str:
    return f"https://127.0.0.1:{port}"


# --- reverse mode with the real SDKs ------------------------------------------------------------


@pytest.mark.sdk
async def test_python_sdk_over_https_to_the_gateway(
    start_gateway: GatewayFactory,
    planes: FakeBraintrust,
    secret: tuple[Path, trustme.LeafCert],
    ca_file: Path,
    sdk_env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BRAINTRUST_APP_PUBLIC_URL", PUBLIC)
    gw = await start_gateway(
        public_url=PUBLIC, **https_listener(secret[0]), **planes.gateway_config(rate_limit="off")
    )
    url = https_url(gw.gateway.ports["listen"])
    env = {"BRAINTRUST_APP_URL": url, "REQUESTS_CA_BUNDLE": str(ca_file)}
    result = await run_in_subprocess(url, API_KEY, env)

    # The login's data plane came back as the gateway's own URL, over TLS.
    assert result.api_url == f"{url}/data-plane"
    assert result.proxy_url == f"{url}/data-plane"
    assert result.rows == [("a", "b"), ("c", "d")]
    assert planes.control.paths() == ["/api/apikey/login"]
    assert "/logs3" in planes.data.paths()
    for plane in (planes.control, planes.data):
        assert plane.failures() == [], [(r.method, r.path, r.status) for r in plane.failures()]
        for request in plane.requests:
            assert "1.1 bt-gateway" in request.headers.get("Via", ""), request.path
            assert request.headers.get("X-Forwarded-Proto") == "https", request.path


@pytest.mark.sdk
async def test_js_sdk_over_https_to_the_gateway(
    start_gateway: GatewayFactory,
    planes: FakeBraintrust,
    secret: tuple[Path, trustme.LeafCert],
    ca_file: Path,
) -> None:
    node = require_node()
    gw = await start_gateway(
        public_url=PUBLIC, **https_listener(secret[0]), **planes.gateway_config(rate_limit="off")
    )
    url = https_url(gw.gateway.ports["listen"])
    out = await run_flow(
        node,
        {
            "BRAINTRUST_APP_URL": url,
            "BRAINTRUST_API_KEY": API_KEY,
            "BRAINTRUST_APP_PUBLIC_URL": PUBLIC,
            "NODE_EXTRA_CA_CERTS": str(ca_file),
            "NO_PROXY": "127.0.0.1,localhost",
        },
    )
    assert out["login"]["apiUrl"] == f"{url}/data-plane"
    assert out["dataset"]["rows"] == [["a", "b"], ["c", "d"]]
    experiment = planes.store.experiments[out["experiment"]["id"]]
    logged = planes.store.rows_of("experiment", experiment["id"])
    assert sorted((r["input"], r["output"]) for r in logged if "scores" in r) == [(0, 0), (1, 2), (2, 4)]
    for plane in (planes.control, planes.data):
        assert plane.requests, plane.name
        for request in plane.requests:
            assert "1.1 bt-gateway" in request.headers.get("Via", ""), request.path


# --- the gateway as an https:// proxy: TLS to it, CONNECT inside -----------------------------------


@contextlib.contextmanager
def serving(config: dict[str, Any], tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(config, tmp_path)
    try:
        yield gw
    finally:
        gw.stop()


async def test_curl_through_the_gateway_as_an_https_proxy(
    named_tls: NamedUpstream, secret: tuple[Path, trustme.LeafCert], ca_file: Path, tmp_path: Path
) -> None:
    """`serve` runs on uvloop: CONNECT takes over its SSL transport (gateway/tunnel.py)."""
    config = {**proxy_config(named_tls), **https_listener(secret[0])}
    with serving(config, tmp_path) as gw:
        proxy = https_url(gw.port)
        code, out, err = await curl(
            "--proxy",
            proxy,
            "--proxy-cacert",
            str(ca_file),
            "--cacert",
            str(ca_file),
            f"{named_tls.url}/x?a=1",
        )
        assert code == 0, err
        assert json.loads(out)["raw_path"] == "/x?a=1"
        [tunnel] = [e for e in await _events(gw, "tunnel") if e["target"] == f"{NAME}:{named_tls.port}"]
        assert tunnel["reason"] == "closed" and tunnel["bytes_down"] > 0


async def _events(gw: GatewayProcess, name: str) -> list[dict[str, Any]]:
    await gw.event(name)  # logged once the tunnel ended
    return gw.events(name)


async def test_requests_through_the_gateway_as_an_https_proxy(
    start_gateway: GatewayFactory,
    named_tls: NamedUpstream,
    secret: tuple[Path, trustme.LeafCert],
    ca_file: Path,
) -> None:
    """urllib3 2 speaks TLS to an https:// proxy and TLS inside its CONNECT; `verify` trusts both."""
    gw = await start_gateway(**proxy_config(named_tls), **https_listener(secret[0]))
    proxy = https_url(gw.gateway.ports["listen"])
    resp = await asyncio.to_thread(
        requests_get, named_tls.url + "/v1/x", {"https": proxy}, verify=str(ca_file)
    )
    assert resp.status_code == 200
    assert resp.json()["raw_path"] == "/v1/x"
    assert named_tls.recorder.requests[-1].raw_path == "/v1/x"
    assert gw.gateway.tunnels.opened == 1


async def test_absolute_form_through_the_gateway_as_an_https_proxy(
    start_gateway: GatewayFactory,
    upstream: Upstream,
    secret: tuple[Path, trustme.LeafCert],
    ca_file: Path,
) -> None:
    """A plain http:// URL through an https:// proxy: TLS to the proxy, an absolute-form request inside."""
    gw = await start_gateway(**absolute_config(upstream), **https_listener(secret[0]))
    proxy = https_url(gw.gateway.ports["listen"])
    url = f"http://{PLAIN}:{upstream.port}/plain?a=1"
    code, out, err = await curl("--proxy", proxy, "--proxy-cacert", str(ca_file), url)
    assert code == 0, err
    assert json.loads(out)["raw_path"] == "/plain?a=1"
    assert upstream.recorder.requests[-1].raw_path == "/plain?a=1"
    assert gw.gateway.tunnels.opened == 0


async def test_a_tls_client_gone_before_its_tunnel_opens_is_no_half_close(
    start_gateway: GatewayFactory,
    secret: tuple[Path, trustme.LeafCert],
    ca_file: Path,
    caplog: pytest.LogCaptureFixture,
    logs: Logs,
) -> None:
    """TLS has no half-close: a client closing right after its CONNECT ends the connection (asyncio warns
    when a protocol asks to keep an SSL transport open, as the plain-TCP path does for the tunnel's FIN)."""
    allow = [*GatewayConfig().allowlist, "slow.test"]
    gw = await start_gateway(allowlist=allow, resolve={"slow.test": "192.0.2.1"}, **https_listener(secret[0]))
    async with asyncio.timeout(HANG_GUARD_S):
        _, writer = await asyncio.open_connection(
            "127.0.0.1", gw.gateway.ports["listen"], ssl=client_context(ca_file)
        )
        writer.write(b"CONNECT slow.test:443 HTTP/1.1\r\nHost: slow.test:443\r\n\r\n")
        writer.close()  # close_notify right behind the request: the dial (to TEST-NET) is still pending
        while not logs.named("access"):  # the CONNECT ended (the client left)
            await asyncio.sleep(0.02)
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


# --- what is not TLS, and what never finishes it ---------------------------------------------------


async def test_the_listener_negotiates_http11_only(
    start_gateway: GatewayFactory, secret: tuple[Path, trustme.LeafCert], ca_file: Path
) -> None:
    """A client offering h2 first still gets HTTP/1.1: the gateway speaks no HTTP/2. (The TLS 1.2 floor
    is the context's, tests/unit/test_certs.py; a TLS 1.1 client is refused by its own OpenSSL first.)"""
    gw = await start_gateway(**https_listener(secret[0]))
    context = client_context(ca_file)
    context.set_alpn_protocols(["h2", "http/1.1"])
    async with asyncio.timeout(HANG_GUARD_S):
        _, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.ports["listen"], ssl=context)
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    writer.close()


async def test_cleartext_http_to_the_tls_port_gets_no_http_answer(
    start_gateway: GatewayFactory, secret: tuple[Path, trustme.LeafCert]
) -> None:
    gw = await start_gateway(**https_listener(secret[0]))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.ports["listen"])
    writer.write(b"GET /api/apikey/login HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-x\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(HANG_GUARD_S):
        answer = await reader.read()  # to EOF: the gateway closes the connection
    writer.close()
    assert b"HTTP/" not in answer  # at most a TLS alert record, never an HTTP response


async def test_a_stalled_handshake_is_closed_by_the_gateway(
    start_gateway: GatewayFactory, secret: tuple[Path, trustme.LeafCert]
) -> None:
    """A client that connects and never sends a ClientHello: the head timeout cannot see it (the HTTP
    protocol starts after the handshake); the handshake bound (header_timeout_s) closes it."""
    gw = await start_gateway(**https_listener(secret[0], header_timeout_s=1))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.ports["listen"])
    async with asyncio.timeout(HANG_GUARD_S):  # well under asyncio's own 60 s default
        assert await reader.read() == b""
    writer.close()


# --- rotation ---------------------------------------------------------------------------------------


async def _presents(port: int, ca_file: Path, serial: int) -> None:
    """Poll new handshakes until the gateway presents the certificate with `serial` (bounded)."""
    async with asyncio.timeout(HANG_GUARD_S):
        while await peer_serial(port, ca_file) != serial:
            await asyncio.sleep(0.05)


async def test_a_certificate_swapped_on_disk_is_served_without_a_restart(
    start_gateway: GatewayFactory,
    secret: tuple[Path, trustme.LeafCert],
    test_ca: trustme.CA,
    ca_file: Path,
    logs: Logs,
) -> None:
    directory, first = secret
    gw = await start_gateway(**https_listener(directory))
    port = gw.gateway.ports["listen"]
    assert await peer_serial(port, ca_file) == serial_of(first)
    second = issue(test_ca)
    write_secret(directory, "v2", *leaf_pems(second))
    await _presents(port, ca_file, serial_of(second))

    # A broken version (the key of another certificate): the old one keeps serving, one line says why.
    third, other = issue(test_ca), issue(test_ca)
    write_secret(directory, "v3", leaf_pems(third)[0], leaf_pems(other)[1])
    async with asyncio.timeout(HANG_GUARD_S):
        while not logs.named("tls_reload_failed"):
            await asyncio.sleep(0.05)
    assert await peer_serial(port, ca_file) == serial_of(second)

    fourth = issue(test_ca)  # the fix is picked up; the broken version was logged once, not per poll
    write_secret(directory, "v4", *leaf_pems(fourth))
    await _presents(port, ca_file, serial_of(fourth))
    [failed] = logs.named("tls_reload_failed")
    assert failed["problem"] == (
        f"listen.tls.key_file: '{directory / 'tls.key'}' is not the key of the certificate in cert_file"
    )
    assert len(logs.named("tls_reloaded")) == 2


async def rsa_only_serial(port: int, ca_file: Path) -> int:
    """A handshake as a client that accepts only an RSA certificate (TLS 1.2, ECDHE-RSA ciphers)."""
    context = client_context(ca_file)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384")
    async with asyncio.timeout(HANG_GUARD_S):
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
    try:
        return int(writer.get_extra_info("peercert")["serialNumber"], 16)
    finally:
        writer.close()


async def test_a_rotation_retires_the_old_key_even_of_another_type(
    start_gateway: GatewayFactory, test_ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> None:
    """OpenSSL holds one certificate per key type in a context: an ECDSA pair loaded over an RSA one
    would leave the RSA key serving clients that ask for it. Each pair gets a context of its own."""
    directory = tmp_path / "tls"
    rsa = test_ca.issue_cert("127.0.0.1", key_type=trustme.KeyType.RSA)
    write_secret(directory, "v1", *leaf_pems(rsa))
    gw = await start_gateway(**https_listener(directory))
    port = gw.gateway.ports["listen"]
    assert await rsa_only_serial(port, ca_file) == serial_of(rsa)
    ecdsa = test_ca.issue_cert("127.0.0.1", key_type=trustme.KeyType.ECDSA)
    write_secret(directory, "v2", *leaf_pems(ecdsa))
    await _presents(port, ca_file, serial_of(ecdsa))
    with pytest.raises((ssl.SSLError, ConnectionError)):  # no RSA key left to serve it: the old one is gone
        await rsa_only_serial(port, ca_file)


async def test_a_reload_reads_the_certificate_again_and_tls_on_off_needs_a_restart(
    secret: tuple[Path, trustme.LeafCert], test_ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> None:
    """SIGHUP and POST /reload re-read the files, following a change of path; the listener stays."""
    directory, first = secret
    config = https_listener(directory)
    with serving(config, tmp_path) as gw:
        assert await peer_serial(gw.port, ca_file) == serial_of(first)
        other = tmp_path / "other-tls"
        second = issue(test_ca)
        write_secret(other, "v1", *leaf_pems(second))
        listeners = "admin: {host: 127.0.0.1, port: 0}\nlisten:\n  host: 127.0.0.1\n  port: 0\n"  # as running
        cert, key = tls_config(other).values()
        gw.config_path.write_text(listeners + f"  tls: {{cert_file: '{cert}', key_file: '{key}'}}\n")
        gw.signal(signal.SIGHUP)
        await _presents(gw.port, ca_file, serial_of(second))

        # A pair that does not load: the reload is refused with the check-config line, the old one serves.
        (other / "tls.key").unlink()
        (other / "tls.key").write_bytes(leaf_pems(issue(test_ca))[1])
        assert await _reload(gw) == [
            f"{gw.config_path}:5: listen.tls.key_file: '{other / 'tls.key'}' is not the key of the "
            "certificate in cert_file"
        ]
        assert await peer_serial(gw.port, ca_file) == serial_of(second)

        gw.config_path.write_text(listeners)  # TLS off
        expected = (
            f"{gw.config_path}:2: listen.tls: turning TLS off needs a restart; the rest of the config "
            "was reloaded"
        )
        async with aiohttp.ClientSession() as admin:  # the rest applies; the pair in use is read again
            async with admin.post(f"http://127.0.0.1:{gw.admin_port}/reload") as resp:
                body = await resp.json()
        assert (resp.status, body["restart_needed"], len(body["problems"])) == (422, [expected], 1)
        assert body["problems"][0].startswith("listen.tls: the certificate pair did not load")
        assert await peer_serial(gw.port, ca_file) == serial_of(second)


async def _reload(gw: GatewayProcess) -> list[str]:
    """POST /reload, which must be refused: the problem lines it answers."""
    async with aiohttp.ClientSession() as admin:
        async with admin.post(f"http://127.0.0.1:{gw.admin_port}/reload") as resp:
            assert resp.status == 422
            problems: list[str] = (await resp.json())["problems"]
    return problems
