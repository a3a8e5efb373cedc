"""CONNECT tunnel mechanics (half-close, idle timeout, leaks, limits, addresses) and the real CLI's logs.

The server behind most tunnels here reads until EOF, then answers with the byte count and closes, so a
client that half-closes must still get the answer after its own FIN.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from gateway.policy.proxyauth import hash_password
from gateway.tunnel import TunnelStats
from tests.clients import HANG_GUARD_S, assert_error, basic, closed_by_peer, curl, raw_connect, read_reply
from tests.conftest import NAME, Canary, GatewayFactory, Logs, Upstream, serve_named_tls
from tests.gateway_process import GatewayProcess
from tests.integration.test_forward_proxy import (
    PASSWORD,
    PLAIN,
    USER,
    proxy_config,
    requests_get,
    settle,
)


@dataclass
class CountServer:
    port: int
    accepts: int = 0
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)


@pytest.fixture
async def count_server() -> AsyncIterator[CountServer]:
    state = CountServer(port=0)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        state.tasks.add(task)
        state.accepts += 1
        count = 0
        try:
            while data := await reader.read(2**16):
                count += len(data)
            writer.write(str(count).encode())
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            state.tasks.discard(task)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    yield state
    server.close()
    for task in list(state.tasks):
        task.cancel()
    await asyncio.gather(*state.tasks, return_exceptions=True)
    await server.wait_closed()


def tunnel_config(port: int, *extra_allow: str, **forward_proxy: Any) -> dict[str, Any]:
    return {
        "allowlist": [NAME, *extra_allow],
        "resolve": {NAME: "127.0.0.1"},
        "routes": [{"name": "app", "prefix": "/", "upstream": f"https://{NAME}"}],
        "forward_proxy": {"connect_ports": [port], **forward_proxy},
    }


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_half_close_still_gets_the_reply(
    start_gateway: GatewayFactory, count_server: CountServer
) -> None:
    gw = await start_gateway(**tunnel_config(count_server.port))
    stats: TunnelStats = gw.gateway.tunnels
    async with raw_connect(gw.gateway.ports["listen"], f"{NAME}:{count_server.port}") as (answer, reader, w):
        assert answer.status == 200
        assert answer.headers == {}  # `200 Connection Established`, no Content-Length / Transfer-Encoding
        w.write(b"x" * 300_000)  # more than the relay's buffers: exercises back-pressure both ways
        await w.drain()
        w.write_eof()
        assert await asyncio.wait_for(reader.read(), HANG_GUARD_S) == b"300000"
    assert await settle(lambda: stats.active == 0)
    assert stats.opened == 1
    assert stats.bytes_up == 300_000 and stats.bytes_down == 6
    assert stats.close_reasons == {"closed": 1}


async def test_bytes_pipelined_after_connect_head_are_relayed(
    start_gateway: GatewayFactory, count_server: CountServer
) -> None:
    gw = await start_gateway(**tunnel_config(count_server.port))
    target = f"{NAME}:{count_server.port}"
    async with raw_connect(gw.gateway.ports["listen"], target, tail=b"early" * 10) as (answer, reader, w):
        assert answer.status == 200
        w.write(b"late")
        w.write_eof()
        assert await asyncio.wait_for(reader.read(), HANG_GUARD_S) == b"54"


async def test_idle_tunnel_is_closed(start_gateway: GatewayFactory, count_server: CountServer) -> None:
    gw = await start_gateway(**tunnel_config(count_server.port, idle_timeout_s=0.5))
    stats: TunnelStats = gw.gateway.tunnels
    async with raw_connect(gw.gateway.ports["listen"], f"{NAME}:{count_server.port}") as (answer, reader, _):
        assert answer.status == 200
        assert await closed_by_peer(reader)  # the gateway hung up on us
    assert await settle(lambda: stats.active == 0)
    assert stats.close_reasons == {"idle_timeout": 1}
    assert await settle(lambda: not count_server.tasks)  # and on the upstream


async def test_client_disconnects_leak_no_sockets(
    start_gateway: GatewayFactory, count_server: CountServer
) -> None:
    gw = await start_gateway(**tunnel_config(count_server.port))
    stats: TunnelStats = gw.gateway.tunnels
    port = gw.gateway.ports["listen"]
    target = f"{NAME}:{count_server.port}"

    async def open_tunnel() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert (await read_reply(reader, head_only=True)).status == 200  # a 2xx to CONNECT has no body
        writer.write(b"half a request")
        await writer.drain()
        return writer

    (await open_tunnel()).close()  # warm-up: any lazily opened descriptor exists from here on
    assert await settle(lambda: stats.active == 0)
    before = fd_count()

    writers = await asyncio.gather(*(open_tunnel() for _ in range(20)))
    assert await settle(lambda: stats.active == 20)
    for index, writer in enumerate(writers):
        if index % 2:
            writer.close()  # FIN
        else:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST

    assert await settle(lambda: stats.active == 0 and fd_count() <= before), (stats, fd_count(), before)
    assert stats.opened == 21
    assert sum(stats.close_reasons.values()) == 21
    assert set(stats.close_reasons) <= {"closed", "reset"}, stats.close_reasons
    assert await settle(lambda: not count_server.tasks)


async def test_new_tunnels_are_rate_limited_per_client(
    start_gateway: GatewayFactory, count_server: CountServer
) -> None:
    gw = await start_gateway(
        **tunnel_config(count_server.port, rate_limit={"max_tunnels": 2, "window_minutes": 1})
    )
    port = gw.gateway.ports["listen"]
    target = f"{NAME}:{count_server.port}"
    for _ in range(2):
        async with raw_connect(port, target) as (answer, _, _):
            assert answer.status == 200
    async with raw_connect(port, target) as (answer, _, _):
        assert_error(answer, 429, "rate_limited")
        assert 1 <= int(answer.headers["retry-after"]) <= 60
    stats: TunnelStats = gw.gateway.tunnels
    assert stats.opened == 2 and stats.refused == 1
    assert await settle(lambda: count_server.accepts == 2)


async def test_deny_private_refuses_a_name_resolving_to_loopback(
    start_gateway: GatewayFactory, canary: Canary, logs: Logs
) -> None:
    gw = await start_gateway(**tunnel_config(canary.port, deny_private_addresses=True))
    async with raw_connect(gw.gateway.ports["listen"], f"{NAME}:{canary.port}") as (answer, _, _):
        assert_error(answer, 403, "egress_denied")
    assert gw.gateway.tunnels.refused == 1 and gw.gateway.tunnels.opened == 0
    assert canary.accepts == []
    assert "127.0.0.1" not in answer.json()["error"]["message"]  # the client learns the name it asked for
    event = await logs.access(f"{NAME}:{canary.port}")
    assert (event["reason"], event["upstream_address"]) == ("private_address", "127.0.0.1")


async def test_deny_private_allows_a_literally_listed_address(
    start_gateway: GatewayFactory, count_server: CountServer
) -> None:
    config = tunnel_config(count_server.port, "127.0.0.1", deny_private_addresses=True)
    gw = await start_gateway(**config)
    port = gw.gateway.ports["listen"]
    for target in (f"{NAME}:{count_server.port}", f"127.0.0.1:{count_server.port}"):
        async with raw_connect(port, target) as (answer, reader, writer):
            assert answer.status == 200
            writer.write(b"abc")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), HANG_GUARD_S) == b"3"
    assert gw.gateway.tunnels.opened == 2


async def test_half_close_right_after_a_pipelined_connect(
    start_gateway: GatewayFactory, count_server: CountServer
) -> None:
    gw = await start_gateway(**tunnel_config(count_server.port))
    target = f"{NAME}:{count_server.port}"
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.ports["listen"])
    try:
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nabc".encode())
        writer.write_eof()  # like `printf 'CONNECT ...' | nc -N`: all sent, then FIN
        reply = await read_reply(reader, head_only=True)
        relayed = await asyncio.wait_for(reader.read(), HANG_GUARD_S)  # the tunnel, to the server's close
    finally:
        writer.close()
    assert (reply.version, reply.status, relayed) == ("HTTP/1.1", 200, b"3")


# --- the real CLI subprocess (uvloop, JSON logs): what reaches the logs ----------------------------


async def test_proxy_credentials_never_reach_the_logs(
    tmp_path: Path, test_ca: trustme.CA, canary: Canary, upstream: Upstream, ca_file: Path
) -> None:
    users = {USER: hash_password(PASSWORD, log2_n=10)}
    async with serve_named_tls(test_ca, canary) as tls:
        config = proxy_config(
            tls, f"{PLAIN}:{upstream.port}", auth={"users": users}, http_ports=[upstream.port]
        )
        gw = GatewayProcess(config, tmp_path)
        try:
            code, _, err = await curl(
                "-x", gw.url, "-U", f"{USER}:{PASSWORD}", "--cacert", str(ca_file), tls.url + "/c"
            )
            assert code == 0, err
            authed = gw.url.replace("http://", f"http://{USER}:{PASSWORD}@")
            resp = await asyncio.to_thread(
                requests_get, f"http://{PLAIN}:{upstream.port}/a", {"http": authed}
            )
            assert resp.status_code == 200
            wrong = gw.url.replace("http://", f"http://{USER}:{PASSWORD}x@")
            resp = await asyncio.to_thread(requests_get, f"http://{PLAIN}:{upstream.port}/a", {"http": wrong})
            assert resp.status_code == 407
            assert await settle(lambda: bool(gw.events("tunnel")))  # logged before the drain starts
        finally:
            assert gw.stop() == 0
    everything = "".join(gw.raw_lines)
    assert gw.events("tunnel") and len(gw.events("access")) == 3
    for secret in (PASSWORD, basic(USER, PASSWORD).split()[1], basic(USER, PASSWORD + "x").split()[1]):
        assert secret not in everything
    assert "proxy_auth:deny" in json.dumps(gw.events("access"))


async def test_cli_tunnel_logs_one_tunnel_event(
    tmp_path: Path, test_ca: trustme.CA, canary: Canary, ca_file: Path
) -> None:
    async with serve_named_tls(test_ca, canary) as tls:
        gw = GatewayProcess(proxy_config(tls), tmp_path)
        try:
            code, out, err = await curl("-x", gw.url, "--cacert", str(ca_file), tls.url + "/hello")
            assert code == 0, err
            assert json.loads(out)["raw_path"] == "/hello"
            assert await settle(lambda: bool(gw.events("tunnel")))  # logged before the drain starts
        finally:
            assert gw.stop() == 0
    (event,) = gw.events("tunnel")
    assert event["logger"] == "gateway.tunnel"
    assert event["client"] == "127.0.0.1"
    assert event["target"] == f"{NAME}:{tls.port}"
    assert event["address"] == "127.0.0.1"
    assert event["bytes_up"] > 0 and event["bytes_down"] > len(out)
    assert isinstance(event["duration_ms"], float) and event["duration_ms"] >= 0
    # curl closes its socket outright; a TLS close_notify the upstream sends after that meets an RST.
    assert event["reason"] in ("closed", "reset")
    (access,) = [line for line in gw.events("access") if line["method"] == "CONNECT"]
    assert access["status"] == 200
    assert access["request_id"] == event["request_id"]
    assert access["bytes_in"] == event["bytes_up"] and access["bytes_out"] == event["bytes_down"]
    assert canary.accepts == []
