"""Egress through a corporate proxy (`upstream.proxy`): tunnels are chained with a CONNECT to it.

The corporate proxy here is a real CONNECT proxy on loopback. It records every CONNECT it is asked for and
resolves names itself (as a real one would), so the gateway never needs to resolve the final target.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.clients import assert_error, curl, raw_connect
from tests.conftest import NAME, Canary, GatewayFactory, Logs, NamedUpstream, RawUpstream
from tests.gateway_process import GatewayProcess
from tests.integration.test_relay import SECRET, assert_no_secret_logged, forged_link, put


@dataclass
class CorporateProxy:
    """A CONNECT-only proxy that answers `status` (200 to tunnel) and records each request head."""

    port: int = 0
    status: int = 200
    seen: list[dict[str, str]] = field(default_factory=list)  # {"target": ..., "proxy-authorization": ...}

    @property
    def url(self) -> str:
        return f"http://corp:s3cret@127.0.0.1:{self.port}"


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(2**16):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.fixture
async def corporate_proxy() -> AsyncIterator[CorporateProxy]:
    proxy = CorporateProxy()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ")
        fields = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)
        }
        proxy.seen.append({"method": method, "target": target, **fields})
        if proxy.status != 200:
            writer.write(f"HTTP/1.1 {proxy.status} Refused\r\nContent-Length: 0\r\n\r\n".encode())
            writer.close()
            return
        host, _, port = target.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1" if host == NAME else host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    yield proxy
    server.close()
    await server.wait_closed()


def chained_config(tls: NamedUpstream, proxy: CorporateProxy) -> dict[str, object]:
    """NAME is allow-listed but not in `resolve`: only the corporate proxy knows where it is."""
    return {
        "allowlist": [NAME],
        "routes": [{"name": "app", "prefix": "/", "upstream": tls.url}],
        "upstream": {"proxy": proxy.url},
        "forward_proxy": {"connect_ports": [tls.port]},
    }


async def test_tunnels_are_chained_through_the_corporate_proxy(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, corporate_proxy: CorporateProxy, ca_file: Path
) -> None:
    gw = await start_gateway(**chained_config(named_tls, corporate_proxy))
    code, out, err = await curl("-x", gw.url, "--cacert", str(ca_file), named_tls.url + "/through")
    assert code == 0, err
    assert json.loads(out)["raw_path"] == "/through"
    [seen] = corporate_proxy.seen
    assert (seen["method"], seen["target"]) == ("CONNECT", f"{NAME}:{named_tls.port}")
    assert seen["proxy-authorization"] == "Basic " + base64.b64encode(b"corp:s3cret").decode()


async def test_the_allow_list_still_judges_the_final_target(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, corporate_proxy: CorporateProxy, canary: Canary
) -> None:
    config = chained_config(named_tls, corporate_proxy)
    config["forward_proxy"] = {"connect_ports": [named_tls.port, canary.port]}
    gw = await start_gateway(**config)
    for target in (f"127.0.0.1:{canary.port}", f"evil.test:{named_tls.port}", f"{NAME}:1"):
        async with raw_connect(gw.gateway.ports["listen"], target) as (answer, _, _):
            assert_error(answer, 403, "egress_denied")
    assert corporate_proxy.seen == []
    assert canary.accepts == []


async def test_a_refusal_by_the_corporate_proxy_is_502_with_its_reason(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, corporate_proxy: CorporateProxy, logs: Logs
) -> None:
    corporate_proxy.status = 403
    gw = await start_gateway(**chained_config(named_tls, corporate_proxy))
    target = f"{NAME}:{named_tls.port}"
    async with raw_connect(gw.gateway.ports["listen"], target) as (answer, _, _):
        assert_error(answer, 502, "upstream_unreachable")
    event = await logs.access(target)
    assert event["reason"] == "proxy_refused"
    assert event["cause"] == f"127.0.0.1:{corporate_proxy.port}: HTTP/1.1 403 Refused"
    assert gw.gateway.tunnels.opened == 0


async def test_a_failed_relay_transfer_logs_no_signed_url(
    corporate_proxy: CorporateProxy, raw_tls_upstream: RawUpstream, tmp_path: Path, ca_file: Path
) -> None:
    """aiohttp's response errors quote the request's URL: the `cause` logged shows it without its query."""
    store = f"{NAME}:{raw_tls_upstream.port}"
    raw_tls_upstream.replies["/k?X-Amz-Signature=c0ffee5ea1"] = b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n"
    config = {
        "allowlist": [store],
        "routes": [{"name": "data", "prefix": "/", "upstream": raw_tls_upstream.url, "advertise": True}],
        "relay": {"allow_hosts": [store], "secret": SECRET},
        "upstream": {"proxy": corporate_proxy.url, "ca_bundle": str(ca_file)},
    }
    gw = GatewayProcess(config, tmp_path)
    try:
        link = forged_link(gw.url, f"https://{store}/k?X-Amz-Signature=c0ffee5ea1")
        assert_error(await put(link), 502, "upstream_bad_response")
    finally:
        gw.stop()
    [seen] = corporate_proxy.seen
    assert (seen["method"], seen["target"]) == ("CONNECT", store)
    [event] = gw.events("access")
    assert event["reason"] == "bad_response"
    assert event["cause"].endswith(f"url='https://{store}/k'"), event["cause"]  # the URL, not its query
    assert_no_secret_logged(gw.raw_lines, link.rpartition("/")[2], "c0ffee5ea1")
