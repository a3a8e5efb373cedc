"""The real CLI's lifecycle: drain that load balancers can see, failed starts, SIGHUP.

Each test runs `bt-gateway serve` as a subprocess, because signals, exit codes and start-up output are
the behaviour under test.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.clients import HANG_GUARD_S, assert_error, closed_by_peer, queued, raw_connect, send_raw
from tests.conftest import Upstream
from tests.gateway_process import GatewayProcess


def config_for(upstream: Upstream, **extra: object) -> dict[str, object]:
    host = upstream.url.split("://")[1]
    return {
        "allowlist": [host],
        "routes": [{"name": "app", "prefix": "/", "upstream": upstream.url}],
        **extra,
    }


async def status_of(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(url) as resp:
        await resp.read()
        return resp.status


async def until_status(client: aiohttp.ClientSession, url: str, wanted: int) -> None:
    """Poll until `url` answers `wanted` (the signal is delivered asynchronously); bounded."""
    async with asyncio.timeout(15):
        while await status_of(client, url) != wanted:
            await asyncio.sleep(0.01)


async def test_sigterm_turns_readiness_off_first_and_keeps_serving_for_the_delay(
    tmp_path: Path, upstream: Upstream
) -> None:
    gw = GatewayProcess(config_for(upstream, shutdown_delay_s=60, shutdown_timeout_s=10), tmp_path)
    readyz = f"http://127.0.0.1:{gw.admin_port}/readyz"
    try:
        async with aiohttp.ClientSession() as client, aiohttp.ClientSession() as fresh:
            assert await status_of(client, readyz) == 200
            in_flight = await client.get(gw.url + "/sse")
            assert await in_flight.content.readuntil(b"\n\n") == b"data: first\n\n"
            gw.terminate()
            await until_status(client, readyz, 503)
            # Load balancers now stop sending; whatever still arrives during the delay is served.
            assert await status_of(fresh, gw.url + "/during-delay") == 200
            gw.signal(signal.SIGTERM)  # a second signal ends the delay: stop accepting now
            await gw.event("gateway_stopping")
            with pytest.raises(aiohttp.ClientConnectionError):
                await status_of(fresh, gw.url + "/after-delay")
            upstream.recorder.sse_gate.set()  # the in-flight stream still completes
            assert await in_flight.content.read() == b"data: second\n\n"
            in_flight.release()
        assert await asyncio.to_thread(gw.wait) == 0
    finally:
        gw.stop()
    assert gw.events("gateway_draining")[0]["shutdown_delay_s"] == 60
    assert [a["path"] for a in gw.events("access")] == ["/during-delay", "/sse"]


async def test_the_delay_ends_by_itself(tmp_path: Path, upstream: Upstream) -> None:
    gw = GatewayProcess(config_for(upstream, shutdown_delay_s=0.5), tmp_path)
    try:
        gw.terminate()
        assert await asyncio.to_thread(gw.wait) == 0
    finally:
        gw.stop()
    names = [line.get("event") for line in gw.lines]
    assert names.index("gateway_draining") < names.index("gateway_stopping") < names.index("gateway_stopped")


def _serve_on(tmp_path: Path, listen_port: int, admin_port: int) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        json.dumps({"listen": {"host": "127.0.0.1", "port": listen_port}, "admin": {"port": admin_port}})
    )
    script = str(Path(sys.executable).parent / "bt-gateway")
    return subprocess.run([script, "serve", "-c", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("busy", ["listen", "admin"])
def test_a_port_in_use_fails_the_start_in_one_line(tmp_path: Path, busy: str) -> None:
    """Exit 1 with one JSON line saying which listener and why; nothing opened is left behind."""
    with socket.socket() as taken, socket.socket() as spare:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        spare.bind(("127.0.0.1", 0))
        busy_port, free_port = taken.getsockname()[1], spare.getsockname()[1]
        spare.close()  # free again: the other listener opens there first, then must be closed
        ports = (busy_port, free_port) if busy == "listen" else (free_port, busy_port)
        result = _serve_on(tmp_path, *ports)
    assert result.returncode == 1
    assert result.stderr == ""
    [line] = result.stdout.splitlines()
    event = json.loads(line)
    assert event["event"] == "startup_failed" and event["level"] == "error"
    assert event["error"] == f"cannot listen on 127.0.0.1:{busy_port} ({busy}): address already in use"
    assert event["config"] == str(tmp_path / "gateway.yaml")


async def test_open_tunnels_are_cut_at_the_shutdown_deadline(tmp_path: Path, upstream: Upstream) -> None:
    """Tunnels hold no request aiohttp could wait on: the deadline cancels them like any request."""
    target = f"127.0.0.1:{upstream.port}"
    config = config_for(upstream, shutdown_timeout_s=1, forward_proxy={"connect_ports": [upstream.port]})
    gw = GatewayProcess(config, tmp_path)
    try:
        async with raw_connect(gw.port, target) as (answer, reader, _):
            assert answer.status == 200  # an idle tunnel, open when SIGTERM comes
            gw.terminate()
            assert await closed_by_peer(reader)
        assert await asyncio.to_thread(gw.wait) == 0
    finally:
        gw.stop()
    [tunnel] = gw.events("tunnel")
    assert tunnel["reason"] == "cancelled"
    [access] = gw.events("access")
    assert (access["path"], access["error_code"]) == (target, "shutting_down")
    names = [line.get("event") for line in gw.lines]
    assert names.index("gateway_stopping") < names.index("tunnel") < names.index("gateway_stopped")


def test_signals_that_keep_coming_while_it_exits_do_not_change_its_exit_code(
    tmp_path: Path, upstream: Upstream
) -> None:
    """SIGTERMs sent without pause until the process is gone still end in exit 0, not a death by signal."""
    gw = GatewayProcess(config_for(upstream), tmp_path)
    try:
        assert gw.signal_until_exit(signal.SIGTERM) == 0
    finally:
        gw.stop()
    assert gw.events("gateway_stopped")


def hangups_until_started(gw: GatewayProcess) -> int:
    """SIGHUP, each one delivered, from the moment the process handles it until its start-up line is
    read: the whole slow part of its start (imports, config, first generation). How many were sent."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not (gw.handles(signal.SIGHUP) or gw.is_started):
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway neither handled SIGHUP nor started")
    sent = 0
    while not gw.is_started:
        gw.signal_delivered(signal.SIGHUP)
        sent += 1
    return sent


async def test_a_sighup_during_start_up_is_held_then_applied_once_serving(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Python's default for SIGHUP is death: it is handled from the first lines the gateway runs, and
    whatever came before it serves becomes one reload once it does (the file may have changed)."""
    config = config_for(upstream, listen={"host": "127.0.0.1", "port": 0})
    gw = GatewayProcess(config, tmp_path, wait=False)
    try:
        sent = await asyncio.to_thread(hangups_until_started, gw)
        gw.started()
        held = await gw.event("reload_held_during_startup")
        await gw.event("config_reloaded")
        async with aiohttp.ClientSession() as client:
            assert await status_of(client, gw.url + "/x") == 200
    finally:
        assert gw.stop() == 0
    assert sent > 0 and held
    assert gw.events("config_reload_failed") == []
    names = [line.get("event") for line in gw.lines]
    assert names.index("gateway_started") < names.index("reload_held_during_startup")


async def test_a_request_waiting_for_a_slot_at_shutdown_gets_503_with_retry_after(
    tmp_path: Path, upstream: Upstream
) -> None:
    """An upload held by `on_limit: delay` when SIGTERM comes is answered, never cut at the deadline."""
    limit = {"max_requests": 1, "window_minutes": 1, "on_limit": "delay", "max_delay_s": 90}
    gw = GatewayProcess(config_for(upstream, rate_limit=limit, shutdown_timeout_s=5), tmp_path)
    upload = (
        b"POST /upload HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer tok\r\nContent-Length: 5\r\n\r\nhello"
    )
    try:
        assert (await send_raw(gw.port, upload)).status == 200
        waiting = asyncio.ensure_future(send_raw(gw.port, upload))
        await queued(gw.admin_port, 1)
        gw.terminate()
        reply = await waiting
        assert_error(reply, 503, "shutting_down")
        assert 1 <= int(reply.headers["Retry-After"]) <= 60  # when the window frees a slot
    finally:
        assert gw.stop() == 0
    refused = [a for a in gw.events("access") if a["status"] == 503]
    assert [(a["error_code"], a["decisions"][-1]) for a in refused] == [
        ("shutting_down", "ratelimit:shutting_down")
    ]
