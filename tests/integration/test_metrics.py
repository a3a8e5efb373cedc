"""`GET /metrics` on the admin listener: exact counts for a known mix of traffic, and bounded labels."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from tests.clients import (
    HANG_GUARD_S,
    assert_error,
    free_port,
    get,
    raw_connect,
    read_reply,
    scrape,
    scrape_text,
    send_raw,
    value,
)
from tests.conftest import GatewayFactory, Logs, Upstream, route_to
from tests.gateway_process import GatewayProcess

TOKEN = "sk-metrics-token-never-a-label"


async def test_a_known_mix_is_counted_exactly(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(upstream), rate_limit={"max_requests": 3})
    port = gw.gateway.ports["listen"]
    received = 0
    async with aiohttp.ClientSession() as client:
        for _ in range(5):  # 3 allowed, 2 rate-limited
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with client.post(gw.url + "/v1/rows", data=b"0123456789", headers=headers) as resp:
                body = await resp.read()
                received += len(body) if resp.status == 200 else 0
    denied = await send_raw(port, b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    async with raw_connect(port, "evil.example:443") as (refused, _, _):
        pass
    assert (denied.status, refused.status) == (403, 403)

    samples = await scrape(gw.admin_url)
    requests = "bt_gateway_requests_total"
    assert value(samples, requests, route="app", status="200") == 3
    assert value(samples, requests, route="app", status="429") == 2
    assert value(samples, requests, route="forward_proxy", status="403") == 1
    assert value(samples, requests, route="tunnel", status="403") == 1
    assert sum(v for (name, _), v in samples.items() if name == requests) == 7
    assert value(samples, "bt_gateway_refusals_total", code="rate_limited") == 2
    assert value(samples, "bt_gateway_refusals_total", code="egress_denied") == 2
    assert value(samples, "bt_gateway_upstream_duration_seconds_count", route="app") == 3
    assert value(samples, "bt_gateway_bytes_total", route="app", direction="in") == 30
    assert value(samples, "bt_gateway_bytes_total", route="app", direction="out") == received > 0
    assert value(samples, "bt_gateway_tunnels_active") == 0
    assert value(samples, "bt_gateway_rate_limit_storage_errors_total") == 0
    assert value(samples, "bt_gateway_config_reloads_total", result="failure") == 0
    assert value(samples, "bt_gateway_build_info", version=__version__) == 1
    label_values = {v for (_, labels) in samples for _, v in labels}
    for secret_or_unbounded in (TOKEN, "/v1/rows", "127.0.0.1", "evil.example"):
        assert not [v for v in label_values if secret_or_unbounded in v]


async def test_tunnels_are_counted_by_close_reason(
    start_gateway: GatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    target = f"127.0.0.1:{upstream.port}"
    gw = await start_gateway(
        **route_to(upstream), forward_proxy={"connect_ports": [upstream.port], "idle_timeout_s": 30}
    )
    async with raw_connect(gw.gateway.ports["listen"], target) as (answer, reader, writer):
        assert answer.status == 200
        assert value(await scrape(gw.admin_url), "bt_gateway_tunnels_active") == 1
        writer.write(b"GET /through HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await read_reply(reader)).status == 200
    await logs.access(target)  # the tunnel ended and was accounted
    samples = await scrape(gw.admin_url)
    assert value(samples, "bt_gateway_tunnels_active") == 0
    assert value(samples, "bt_gateway_tunnels_total", reason="closed") == 1
    assert value(samples, "bt_gateway_requests_total", route="tunnel", status="200") == 1


async def test_upstream_failures_are_counted_by_route_apart_from_refusals(
    start_gateway: GatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    """Unreachable (502) and timed out (504) count; the upstream's own 502 and a policy's 403 do not."""
    host = upstream.url.split("://")[1]
    gone = f"http://127.0.0.1:{free_port()}"
    gw = await start_gateway(
        allowlist=[host, gone.split("://")[1]],
        routes=[
            {"name": "gone", "prefix": "/gone", "upstream": gone},
            {"name": "app", "prefix": "/", "upstream": upstream.url},
        ],
        deny_paths=["/denied"],
        upstream={"read_timeout_s": 0.3},
    )
    port = gw.gateway.ports["listen"]
    for target, status, code in (
        ("/gone/a", 502, "upstream_unreachable"),
        ("/gone/b", 502, "upstream_unreachable"),
        ("/hang", 504, "upstream_timeout"),
        ("/denied", 403, "path_denied"),
    ):
        assert_error(await get(port, target), status, code)
    assert (await get(port, "/status/502")).status == 502  # the upstream's answer, relayed
    await logs.access("/status/502")
    samples = await scrape(gw.admin_url)
    failures = "bt_gateway_upstream_failures_total"
    assert {labels: v for (name, labels), v in samples.items() if name == failures} == {
        frozenset({("route", "gone"), ("code", "upstream_unreachable")}): 2,
        frozenset({("route", "app"), ("code", "upstream_timeout")}): 1,
    }
    assert value(samples, "bt_gateway_refusals_total", code="path_denied") == 1
    assert value(samples, "bt_gateway_requests_total", route="app", status="502") == 1


async def test_no_created_series_anywhere(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    """Every counter has counted (tunnels, reloads, storage, requests): still no `_created` line."""
    gw = await start_gateway(**route_to(upstream), forward_proxy={"connect_ports": [upstream.port]})
    port = gw.gateway.ports["listen"]
    assert (await get(port, "/x")).status == 200
    async with raw_connect(port, f"127.0.0.1:{upstream.port}") as (answer, _, _):
        assert answer.status == 200
    assert not (await gw.gateway.reload()).ok  # no config source: a refused reload, counted
    async with asyncio.timeout(HANG_GUARD_S):
        while value(await scrape(gw.admin_url), "bt_gateway_tunnels_total", reason="closed") != 1:
            await asyncio.sleep(0.01)
    text = await scrape_text(gw.admin_url)
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert {"bt_gateway_tunnels_total", "bt_gateway_requests_total", "process_cpu_seconds_total"} <= names
    assert [name for name in names if name.endswith("_created")] == []
    assert "_created" not in text


def proc_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command name (field 3 onwards, 0-based here)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def boot_time() -> float:
    return next(
        float(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime")
    )


def max_open_files(pid: int) -> float:
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    return float(next(line.split()[3] for line in limits if line.startswith("Max open files")))


async def test_process_metrics_are_the_gateway_process_own(tmp_path: Path, upstream: Upstream) -> None:
    """Read by prometheus-client from the gateway's /proc: fixed values exact, moving ones bracketed by
    readings taken just before and after the scrape."""
    gw = await asyncio.to_thread(GatewayProcess, route_to(upstream), tmp_path)
    try:
        pid, ticks, page = gw.proc.pid, os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        boot, max_files = boot_time(), max_open_files(pid)
        before = proc_stat(pid)
        async with (
            aiohttp.ClientSession() as client
        ):  # the connection stays open: the same fds as during the scrape
            async with client.get(f"http://127.0.0.1:{gw.admin_port}/metrics") as resp:
                text = await resp.text()
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        after = proc_stat(pid)
        samples = {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        assert samples["process_max_fds"] == max_files
        assert samples["process_start_time_seconds"] == float(before[19]) / ticks + boot
        assert samples["process_open_fds"] == fds + 1  # + the directory the collector lists them from
        cpu = [
            float(stat[11]) / ticks + float(stat[12]) / ticks for stat in (before, after)
        ]  # as summed there
        assert cpu[0] <= samples["process_cpu_seconds_total"] <= cpu[1]
        vsize = sorted(float(stat[20]) for stat in (before, after))
        assert vsize[0] <= samples["process_virtual_memory_bytes"] <= vsize[1]
        rss = sorted(float(stat[21]) * page for stat in (before, after))
        assert rss[0] <= samples["process_resident_memory_bytes"] <= rss[1]
    finally:
        gw.stop()
