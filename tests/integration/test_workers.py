"""`workers: 2`: two processes serve one port and one Redis limit; the supervisor starts and stops them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.clients import HANG_GUARD_S, free_port, scrape
from tests.conftest import Upstream, route_to
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer

TOKEN = "sk-workers-test-0123456789"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def two_workers_config(upstream: Upstream, redis: RedisServer, max_requests: int = 5) -> dict[str, Any]:
    return {
        **route_to(upstream),
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": 0},
        "workers": 2,
        "rate_limit": {"max_requests": max_requests, "storage": redis.url},
    }


async def two_workers(tmp_path: Path, config: dict[str, Any], watch: bool = False) -> GatewayProcess:
    """The supervisor with two workers on a fixed port, both started."""
    gw = GatewayProcess(config, tmp_path, args=["--watch"] if watch else [])
    async with asyncio.timeout(30):
        while len(gw.events("gateway_started")) < 2:
            await asyncio.sleep(0.02)
    return gw


async def requests_served(admin_port: int) -> float:
    """The worker's own count of proxied requests, from its /metrics."""
    samples = await scrape(f"http://127.0.0.1:{admin_port}")
    return sum(count for (name, _), count in samples.items() if name == "bt_gateway_requests_total")


async def test_two_workers_share_the_port_and_one_limit(
    tmp_path: Path, upstream: Upstream, redis: RedisServer
) -> None:
    gw = await two_workers(tmp_path, two_workers_config(upstream, redis))
    try:
        started = gw.events("gateway_started")
        assert {e["worker"] for e in started} == {0, 1}
        assert len({e["pid"] for e in started}) == 2
        assert {e["listen"] for e in started} == {gw.port}
        statuses = []
        # A new connection each time, so the kernel spreads them over both workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
            for _ in range(40):
                async with client.get(gw.url + "/x", headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                    statuses.append(resp.status)
        served = [await requests_served(e["admin"]) for e in started]
    finally:
        assert gw.stop() == 0
    # One limit for the token across both processes: 5 allowed in all, not 5 per worker.
    assert statuses == [200] * 5 + [429] * 35
    assert sum(served) == 40
    assert min(served) > 0, served  # both workers took connections
    assert len(gw.events("gateway_stopped")) == 2  # SIGTERM reached both and each drained


async def test_a_worker_that_dies_is_restarted_and_the_supervisor_stays_up(
    tmp_path: Path, upstream: Upstream, redis: RedisServer
) -> None:
    # No limit (0 is off): the kernel may hand the survivor any number of the loop's connections first.
    gw = await two_workers(tmp_path, two_workers_config(upstream, redis, max_requests=0))
    victim = gw.events("gateway_started")[0]
    try:
        os.kill(victim["pid"], signal.SIGKILL)
        restarted = await gw.event("worker_restarted")
        async with asyncio.timeout(HANG_GUARD_S):
            while len(started := gw.events("gateway_started")) < 3:
                await asyncio.sleep(0.02)
        fresh = started[2]
        assert (fresh["worker"], fresh["pid"]) == (victim["worker"], restarted["pid"])
        assert fresh["pid"] != victim["pid"]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
            async with asyncio.timeout(HANG_GUARD_S):  # new connections, until the kernel picks the new one
                while await requests_served(fresh["admin"]) == 0:
                    async with client.get(gw.url + "/x", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                        assert r.status == 200
        assert gw.proc.poll() is None  # the supervisor stayed up
    finally:
        assert gw.stop() == 0
    (exited,) = gw.events("worker_exited")
    assert (exited["worker"], exited["pid"], exited["exit_code"]) == (victim["worker"], victim["pid"], -9)
    assert exited["restart_in_s"] == 0.5  # it died young: a short wait first
    assert len(gw.events("gateway_stopped")) == 2  # the survivor and the new one, each drained


async def test_a_worker_in_a_crash_loop_waits_longer_each_time_then_fails_the_supervisor(
    tmp_path: Path, upstream: Upstream, redis: RedisServer
) -> None:
    """Workers that cannot start (their port is taken) are restarted after 0.5, 1, 2, 4 s, then given up."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = {
            **two_workers_config(upstream, redis),
            "listen": {"host": "127.0.0.1", "port": taken.getsockname()[1]},
        }
        gw = GatewayProcess(config, tmp_path, wait=False)
        try:
            code = await asyncio.to_thread(gw.wait, 60)
        finally:
            gw.stop()
    assert code == 1
    exits = gw.events("worker_exited")
    for worker in (0, 1):
        waits = [e.get("restart_in_s") for e in exits if e["worker"] == worker]
        assert waits[:4] == [0.5, 1.0, 2.0, 4.0]
    assert "stopping the other workers" in exits[-1]["detail"]
    assert gw.events("gateway_started") == []


async def test_sighups_while_workers_start_kill_none(
    tmp_path: Path, upstream: Upstream, redis: RedisServer
) -> None:
    """The supervisor handles SIGHUP from its first lines and passes it on; a worker ignores it until it
    handles it itself, so no SIGHUP during any start-up kills a process."""
    gw = GatewayProcess(two_workers_config(upstream, redis), tmp_path, wait=False)
    try:
        deadline = asyncio.get_running_loop().time() + HANG_GUARD_S
        while len(gw.events("gateway_started")) < 2:
            assert asyncio.get_running_loop().time() < deadline, "the workers did not start"
            if gw.handles(signal.SIGHUP):
                await asyncio.to_thread(gw.signal_delivered, signal.SIGHUP)
        assert gw.proc.poll() is None
    finally:
        assert gw.stop() == 0
    assert gw.events("worker_exited") == []
    assert len(gw.events("gateway_stopped")) == 2


async def test_with_watch_each_worker_watches_and_reloads_the_edited_file(
    tmp_path: Path, upstream: Upstream, redis: RedisServer
) -> None:
    config = two_workers_config(upstream, redis)
    gw = await two_workers(tmp_path, config, watch=True)
    try:
        gw.config_path.write_text(yaml.safe_dump({**config, "deny_paths": ["/secret/**"]}))
        async with asyncio.timeout(30):
            while len(gw.events("config_reloaded")) < 2 and not gw.events("config_reload_failed"):
                await asyncio.sleep(0.02)
        assert len(gw.events("config_watch_started")) == 2  # the supervisor passed --watch to both
    finally:
        assert gw.stop() == 0
    assert (len(gw.events("config_reloaded")), gw.events("config_reload_problem")) == (2, [])


async def test_the_supervisor_exits_0_however_many_signals_come(
    tmp_path: Path, upstream: Upstream, redis: RedisServer
) -> None:
    """Each signal is forwarded to the workers while they run; the ones after they stopped are ignored."""
    gw = await two_workers(tmp_path, two_workers_config(upstream, redis))
    try:
        assert await asyncio.to_thread(gw.signal_until_exit, signal.SIGTERM) == 0
    finally:
        gw.stop()
    assert len(gw.events("gateway_stopped")) == 2


# The supervisor, with its second worker's start interrupted by a SIGTERM to itself: the signal lands
# after that worker's fork, before the supervisor holds it, so only the supervisor's own bookkeeping can
# pass it on. Prints the workers it started, then exits with the supervisor's code.
STOP_DURING_A_START = """
import os, signal, subprocess, sys
from gateway import workers
started = []
class StopDuringTheSecondStart(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        started.append(self.pid)
        if len(started) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
workers.subprocess.Popen = StopDuringTheSecondStart
from gateway.cli import main
code = main()
print("started", *started, flush=True)
sys.exit(code)
"""


def test_a_stop_during_a_workers_start_reaches_it(
    tmp_path: Path, upstream: Upstream, redis: RedisServer
) -> None:
    """No worker is started after the stop, the one being started is stopped too, and nothing hangs."""
    config = {**two_workers_config(upstream, redis), "workers": 3}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-c", STOP_DURING_A_START, "serve", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S * 2,
    )
    [line] = [line for line in result.stdout.splitlines() if line.startswith("started")]
    pids = [int(pid) for pid in line.split()[1:]]
    assert (result.returncode, len(pids)) == (0, 2)  # the third was never started
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped: none left running
