"""Live reload through the real CLI: SIGHUP, POST /reload or `serve --watch` re-reads the YAML file edited.

A good file swaps the whole generation for new requests while requests in flight finish on the old one;
a bad file changes nothing, and says why exactly as `check-config` would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.policy.proxyauth import hash_password
from tests.clients import (
    HANG_GUARD_S,
    Reply,
    assert_error,
    basic,
    closed_by_peer,
    free_port,
    get,
    queued,
    read_reply,
    run_cli,
    scrape,
    send_raw,
    value,
)
from tests.conftest import Upstream
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer


def base_config(upstream: Upstream, **extra: Any) -> dict[str, Any]:
    host = upstream.url.split("://")[1]
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "allowlist": [host],
        "routes": [{"name": "app", "prefix": "/", "upstream": upstream.url}],
        **extra,
    }


def edit(gw: GatewayProcess, config: dict[str, Any]) -> None:
    gw.config_path.write_text(yaml.safe_dump(config))


async def post_reload(gw: GatewayProcess) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://127.0.0.1:{gw.admin_port}/reload") as resp:
            return resp.status, await resp.json()


async def statuses(gw: GatewayProcess, path: str, count: int, token: str = "tok") -> list[int]:
    async with aiohttp.ClientSession() as client:
        out = []
        for _ in range(count):
            async with client.get(gw.url + path, headers={"Authorization": f"Bearer {token}"}) as resp:
                await resp.read()
                out.append(resp.status)
        return out


async def reload_counts(gw: GatewayProcess) -> dict[str, float]:
    samples = await scrape(f"http://127.0.0.1:{gw.admin_port}")
    return {
        result: value(samples, "bt_gateway_config_reloads_total", result=result)
        for result in ("success", "failure")
    }


async def test_sighup_applies_an_edited_file(tmp_path: Path, upstream: Upstream) -> None:
    config = base_config(upstream)
    gw = GatewayProcess(config, tmp_path)
    try:
        assert await statuses(gw, "/data-plane/x", 1) == [200]  # the app route catches everything
        config["routes"].append({"name": "data", "prefix": "/data-plane", "upstream": upstream.url + "/d"})
        config["deny_paths"] = ["/secret/**"]
        edit(gw, config)
        gw.signal(signal.SIGHUP)
        reloaded = await gw.event("config_reloaded")
        assert reloaded["config"] == str(gw.config_path)
        assert await statuses(gw, "/data-plane/x", 1) == [200]
        assert await statuses(gw, "/secret/a", 1) == [403]
        assert await reload_counts(gw) == {"success": 1, "failure": 0}
    finally:
        assert gw.stop() == 0
    assert [a["route"] for a in gw.events("access")] == ["app", "data", "app"]
    assert upstream.recorder.started[1] == "/d/x"  # the new route's upstream base path


async def test_a_bad_file_changes_nothing_and_says_why_like_check_config(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = base_config(upstream)
    gw = GatewayProcess(config, tmp_path)
    try:
        text = yaml.safe_dump({**config, "rate_limit": {"max_request": 1}})
        gw.config_path.write_text(text)
        status, body = await post_reload(gw)
        assert status == 422 and body["status"] == "failed"
        line = body["problems"][0]
        assert line.endswith("rate_limit.max_request: unknown key; did you mean 'max_requests'?")
        assert line.startswith(f"{gw.config_path}:")
        await gw.event("config_reload_failed")  # logged after its problems; the log reader may lag the reply
        assert [e["problem"] for e in gw.events("config_reload_problem")] == [line]
        assert await statuses(gw, "/still", 3) == [200, 200, 200]  # the old generation serves on
        assert await reload_counts(gw) == {"success": 0, "failure": 1}
    finally:
        assert gw.stop() == 0


async def test_moving_a_listener_needs_a_restart_and_the_rest_applies(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = base_config(upstream)
    gw = GatewayProcess(config, tmp_path)
    try:
        edit(gw, {**config, "admin": {"host": "127.0.0.1", "port": gw.admin_port + 1}, "deny_paths": ["/x"]})
        status, body = await post_reload(gw)
        assert (status, body["status"]) == (200, "restart_needed")
        [line] = body["restart_needed"]
        assert line == (
            f"{gw.config_path}:1: admin: changing it needs a restart (running on 127.0.0.1:0, "
            f"asked for 127.0.0.1:{gw.admin_port + 1}); the rest of the config was reloaded"
        )
        assert await statuses(gw, "/x", 1) == [403]  # the rest applied
        again_status, again = await post_reload(gw)  # the old admin port still serves, and still says so
        assert (again_status, again["restart_needed"]) == (200, [line])
        await gw.event("config_restart_needed")
        reloaded = gw.events("config_reloaded")
        assert [e["restart_needed"] for e in reloaded[:1]] == [1]
    finally:
        assert gw.stop() == 0
    assert [e["problem"] for e in gw.events("config_restart_needed")] == [line, line]


async def test_changing_the_number_of_workers_needs_a_restart(tmp_path: Path, upstream: Upstream) -> None:
    redis = RedisServer(tmp_path)
    try:
        listen = {"host": "127.0.0.1", "port": free_port()}  # workers need a fixed port
        config = base_config(upstream, rate_limit={"storage": redis.url}, listen=listen)
        gw = GatewayProcess(config, tmp_path)
        try:
            edit(gw, {**config, "workers": 2})
            status, body = await post_reload(gw)
            lines = gw.config_path.read_text().splitlines()
            line = 1 + next(i for i, text in enumerate(lines) if text.startswith("workers:"))
            assert (status, body["restart_needed"]) == (
                200,
                [
                    f"{gw.config_path}:{line}: workers: changing it needs a restart (running 1, asked "
                    "for 2); the rest of the config was reloaded"
                ],
            )
        finally:
            assert gw.stop() == 0
    finally:
        redis.stop()


async def test_a_reload_shortens_keep_alive_for_new_connections(tmp_path: Path, upstream: Upstream) -> None:
    config = base_config(upstream, limits={"keepalive_timeout_s": 75})
    gw = GatewayProcess(config, tmp_path)
    try:
        edit(gw, {**config, "limits": {"keepalive_timeout_s": 0.5}})
        gw.signal(signal.SIGHUP)
        await gw.event("config_reloaded")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(b"GET /kept HTTP/1.1\r\nHost: gw\r\n\r\n")  # keep-alive: HTTP/1.1's default
            assert (await read_reply(reader)).status == 200
            assert await closed_by_peer(reader)  # idle past 0.5 s: closed, well before 75 s
        finally:
            writer.close()
    finally:
        assert gw.stop() == 0


async def test_a_reload_changes_the_header_limits_for_new_connections(
    tmp_path: Path, upstream: Upstream
) -> None:
    """The parser's bounds (one request line, one header field) follow `limits.max_header_kb` too."""
    config = base_config(upstream, limits={"max_header_kb": 1})
    gw = GatewayProcess(config, tmp_path)
    target, header = "/" + "a" * 2000, f"Host: gw\r\nX-Big: {'b' * 2000}\r\n"
    try:
        assert_error(await get(gw.port, target), 431, "headers_too_large")
        assert_error(await get(gw.port, "/x", header), 431, "headers_too_large")
        edit(gw, {**config, "limits": {"max_header_kb": 64}})
        status, body = await post_reload(gw)
        assert (status, body["status"]) == (200, "reloaded")
        assert (await get(gw.port, target)).status == 200
        assert (await get(gw.port, "/x", header)).status == 200
    finally:
        assert gw.stop() == 0


async def test_rate_limit_counters_survive_a_reload_that_keeps_the_limit(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = base_config(upstream, rate_limit={"max_requests": 3})
    gw = GatewayProcess(config, tmp_path)
    try:
        assert await statuses(gw, "/x", 2) == [200, 200]
        edit(gw, {**config, "deny_paths": ["/nothing/**"]})  # an unrelated change
        assert (await post_reload(gw))[0] == 200
        assert await statuses(gw, "/x", 2) == [200, 429]  # 3 of 3 across the reload
        edit(gw, {**config, "rate_limit": {"max_requests": 5}})  # a new limit counts afresh
        assert (await post_reload(gw))[0] == 200
        assert await statuses(gw, "/x", 6) == [200] * 5 + [429]
    finally:
        assert gw.stop() == 0


async def test_failed_proxy_logins_add_up_across_a_reload(tmp_path: Path, upstream: Upstream) -> None:
    auth = {"users": {"alice": hash_password("right-password", log2_n=10)}, "max_failures_per_minute": 5}
    config = base_config(upstream, forward_proxy={"auth": auth, "http_ports": [upstream.port]})
    gw = GatewayProcess(config, tmp_path)

    async def proxied(password: str) -> Reply:
        host = f"127.0.0.1:{upstream.port}"
        return await send_raw(
            gw.port,
            f"GET http://{host}/x HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: "
            f"{basic('alice', password)}\r\nConnection: close\r\n\r\n".encode(),
        )

    try:
        for _ in range(3):
            assert_error(await proxied("guess"), 407, "proxy_auth_required")
        edit(gw, {**config, "deny_paths": ["/nothing/**"]})  # an unrelated change
        gw.signal(signal.SIGHUP)
        await gw.event("config_reloaded")
        for _ in range(2):
            assert_error(await proxied("guess"), 407, "proxy_auth_required")
        assert_error(await proxied("right-password"), 429, "too_many_auth_failures")  # 5 of 5 in all
        raised = {**auth, "max_failures_per_minute": 6}  # a new limit applies to the same failures
        edit(gw, {**config, "forward_proxy": {"auth": raised, "http_ports": [upstream.port]}})
        assert (await post_reload(gw))[0] == 200
        assert (await proxied("right-password")).status == 200
    finally:
        assert gw.stop() == 0


async def test_delayed_requests_keep_their_order_and_one_bound_across_a_reload(
    tmp_path: Path, upstream: Upstream
) -> None:
    """One request per 5 s, at most 2 waiting: the window must outlast the few steps before the 3rd ask."""
    limit = {"max_requests": 1, "window_minutes": 5 / 60, "on_limit": "delay", "max_queued": 2}
    config = base_config(upstream, rate_limit=limit)
    gw = GatewayProcess(config, tmp_path)
    try:
        assert await statuses(gw, "/first", 1) == [200]
        before = asyncio.ensure_future(statuses(gw, "/before", 1))
        await queued(gw.admin_port, 1)
        edit(gw, {**config, "deny_paths": ["/nothing/**"]})
        assert (await post_reload(gw))[0] == 200
        after = asyncio.ensure_future(statuses(gw, "/after", 1))
        await queued(gw.admin_port, 2)
        assert await statuses(gw, "/over", 1) == [429]  # 2 waiting across the reload: the line is full
        assert [await before, await after] == [[200], [200]]
    finally:
        assert gw.stop() == 0
    served = [a["path"] for a in gw.events("access") if a["status"] == 200]
    assert served == ["/first", "/before", "/after"]  # first come, first served across the reload


async def test_a_burst_of_sighups_builds_a_few_generations_and_applies_the_last_file(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = base_config(upstream)
    gw = GatewayProcess(config, tmp_path)
    burst = 100
    try:
        edit(gw, {**config, "deny_paths": ["/first/**"]})
        for _ in range(burst):  # each one delivered, not merged by the kernel into the one before
            gw.signal_delivered(signal.SIGHUP)
        edit(gw, {**config, "deny_paths": ["/last/**"]})
        gw.signal(signal.SIGHUP)
        async with asyncio.timeout(HANG_GUARD_S):
            while await statuses(gw, "/last/x", 1) != [403]:
                await asyncio.sleep(0.02)
        assert await statuses(gw, "/first/x", 1) == [200]
    finally:
        assert gw.stop() == 0
    generations = len(gw.events("config_reloaded"))
    assert 1 <= generations <= burst // 10, generations
    assert gw.events("config_reload_failed") == []


async def test_a_download_in_flight_finishes_intact_on_the_old_generation(
    tmp_path: Path, upstream: Upstream
) -> None:
    size = 64 * 2**20
    config = base_config(upstream)
    gw = GatewayProcess(config, tmp_path)
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{gw.url}/download/{size}") as resp:
                received = len(await resp.content.readexactly(2**20))
                edit(gw, {**config, "allowlist": [*config["allowlist"], "example.com"]})
                status, _ = await post_reload(gw)
                assert status == 200
                assert await statuses(gw, "/x", 1) == [200]  # new requests: the new generation
                while chunk := await resp.content.read(2**20):
                    assert chunk == b"x" * len(chunk)
                    received += len(chunk)
        assert received == size
        closed = await gw.event("generation_closed")  # the old one, once its download ended
        assert closed["requests_served"] >= 1
    finally:
        assert gw.stop() == 0
    download = [a for a in gw.events("access") if a["path"].startswith("/download/")]
    assert [(a["status"], a["bytes_out"]) for a in download] == [(200, size)]


async def watch_checks(gw: GatewayProcess) -> float:
    samples = await scrape(f"http://127.0.0.1:{gw.admin_port}")
    return value(samples, "bt_gateway_config_watch_checks_total")


async def polled(gw: GatewayProcess, count: int, since: float) -> float:
    """Wait until the watcher polled `count` more times since `since` (a hang guard, not a timing check)."""
    async with asyncio.timeout(30):
        while (checks := await watch_checks(gw)) < since + count:
            await asyncio.sleep(0.05)
    return checks


async def test_watch_applies_an_in_place_edit_without_a_signal(tmp_path: Path, upstream: Upstream) -> None:
    config = base_config(upstream, rate_limit={"max_requests": 2})
    gw = GatewayProcess(config, tmp_path, args=["--watch"])
    try:
        inode = gw.config_path.stat().st_ino
        assert await statuses(gw, "/x", 3) == [200, 200, 429]
        edit(gw, {**config, "rate_limit": {"max_requests": 4}})  # rewritten in place: same inode
        assert gw.config_path.stat().st_ino == inode
        reloaded = await gw.event("config_reloaded")
        assert reloaded["config"] == str(gw.config_path)
        assert await statuses(gw, "/x", 5) == [200] * 4 + [429]  # a new limit counts afresh
        assert await reload_counts(gw) == {"success": 1, "failure": 0}
    finally:
        assert gw.stop() == 0
    # The watcher stopped cleanly: no error event, no traceback, no task destroyed while pending.
    assert gw.events("config_watch_error") == []
    assert [line for line in gw.raw_lines if not line.startswith("{")] == []


def configmap_version(directory: Path, stamp: str, config: dict[str, Any]) -> None:
    """What the kubelet does on a ConfigMap update: a new `..<stamp>/` dir, then `..data` swapped to it."""
    version = directory / f"..{stamp}"
    version.mkdir()
    (version / "gateway.yaml").write_text(yaml.safe_dump(config))
    (directory / "..data_tmp").symlink_to(version.name)
    os.replace(directory / "..data_tmp", directory / "..data")  # atomic: readers see old or new


async def test_watch_applies_a_configmap_update(tmp_path: Path, upstream: Upstream) -> None:
    config = base_config(upstream)
    configmap_version(tmp_path, "2026_12_06_19_00_00.000000001", {})
    (tmp_path / "gateway.yaml").symlink_to("..data/gateway.yaml")
    gw = GatewayProcess(config, tmp_path, args=["--watch"])  # writes `config` through the symlinks
    try:
        assert await statuses(gw, "/x", 1) == [200]
        moved = {**config, "routes": [{"name": "app", "prefix": "/", "upstream": upstream.url + "/v2"}]}
        configmap_version(tmp_path, "2026_12_06_19_05_00.000000002", moved)
        reloaded = await gw.event("config_reloaded")
        assert reloaded["config"] == str(tmp_path / "gateway.yaml")
        assert await statuses(gw, "/x", 1) == [200]
    finally:
        assert gw.stop() == 0
    assert upstream.recorder.started == ["/x", "/v2/x"]  # the second request went to the new upstream


async def test_watch_logs_a_bad_file_once_like_check_config_then_applies_the_fix(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = base_config(upstream)
    gw = GatewayProcess(config, tmp_path, args=["--watch"])
    try:
        edit(gw, {**config, "rate_limit": {"max_request": 1}})
        checked = run_cli("check-config", "-c", str(gw.config_path))
        assert checked.returncode == 2
        [line] = checked.stderr.splitlines()
        assert line.endswith("rate_limit.max_request: unknown key; did you mean 'max_requests'?")
        failed = await gw.event("config_reload_failed")
        assert failed["problems"] == 1
        await polled(gw, 5, since=await watch_checks(gw))  # five more polls of the same bad file
        assert [e["problem"] for e in gw.events("config_reload_problem")] == [line]  # logged once
        assert len(gw.events("config_reload_failed")) == 1
        assert await statuses(gw, "/x", 2) == [200, 200]  # the old generation serves on, no limit
        assert await reload_counts(gw) == {"success": 0, "failure": 1}
        edit(gw, {**config, "rate_limit": {"max_requests": 1}})  # the fix
        await gw.event("config_reloaded")
        assert await statuses(gw, "/x", 2) == [200, 429]
        assert await reload_counts(gw) == {"success": 1, "failure": 1}
    finally:
        assert gw.stop() == 0
    assert [e["problem"] for e in gw.events("config_reload_problem")] == [line]  # all output read now
    assert gw.events("config_watch_error") == []


def effective_sha256(path: Path) -> str:
    """The sha256 of the effective config as `check-config` prints it, in canonical JSON: computed here from
    the command's output, not by the gateway's own function."""
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    text = json.dumps(
        yaml.safe_load(result.stdout), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(text.encode()).hexdigest()


async def reload_state(gw: GatewayProcess) -> tuple[float, float, list[str]]:
    """(last_success, last_timestamp, the config_info hashes) from /metrics."""
    samples = await scrape(f"http://127.0.0.1:{gw.admin_port}")
    hashes = [
        dict(labels)["sha256"]
        for (name, labels), v in samples.items()
        if name == "bt_gateway_config_info" and v == 1
    ]
    return (
        value(samples, "bt_gateway_reload_last_success"),
        value(samples, "bt_gateway_reload_last_timestamp_seconds"),
        hashes,
    )


async def test_the_last_reload_and_the_config_hash_are_exported(tmp_path: Path, upstream: Upstream) -> None:
    config = base_config(upstream)
    started = time.time()
    gw = await asyncio.to_thread(GatewayProcess, config, tmp_path)
    try:
        first = effective_sha256(gw.config_path)
        ok, at, hashes = await reload_state(gw)
        assert (ok, hashes) == (1, [first])  # the start is the first load
        assert started <= at <= time.time()

        gw.config_path.write_text(yaml.safe_dump({**config, "rate_limit": {"max_request": 1}}))
        before = time.time()
        assert (await post_reload(gw))[0] == 422
        ok, at, hashes = await reload_state(gw)
        assert (ok, hashes) == (0, [first])  # refused: the old config serves on, and says so
        assert before <= at <= time.time()

        gw.config_path.write_text("# a comment changes nothing that runs\n" + yaml.safe_dump(config))
        assert (await post_reload(gw))[0] == 200
        assert (await reload_state(gw))[::2] == (1, [first])

        edit(gw, {**config, "deny_paths": ["/admin/**"]})
        second = effective_sha256(gw.config_path)
        before = time.time()
        assert (await post_reload(gw))[0] == 200
        ok, at, hashes = await reload_state(gw)
        assert (ok, hashes) == (1, [second]) and second != first
        assert before <= at <= time.time()
        assert await reload_counts(gw) == {"success": 2, "failure": 1}
    finally:
        assert gw.stop() == 0


async def test_a_secret_alone_leaves_the_config_hash_unchanged(tmp_path: Path, upstream: Upstream) -> None:
    """/metrics is open to anyone who reaches the admin port: the hash is no fingerprint of a secret."""
    config = base_config(upstream, relay={"allow_hosts": ["store.example"], "secret": "a" * 40})
    config["allowlist"] = [*config["allowlist"], "store.example"]
    gw = await asyncio.to_thread(GatewayProcess, config, tmp_path)
    try:
        first = (await reload_state(gw))[2]
        edit(gw, {**config, "relay": {"allow_hosts": ["store.example"], "secret": "b" * 40}})
        assert (await post_reload(gw))[0] == 200
        assert (await reload_state(gw))[2] == first == [effective_sha256(gw.config_path)]
    finally:
        assert gw.stop() == 0


async def test_the_store_gauge_follows_a_reload_to_another_store(tmp_path: Path, upstream: Upstream) -> None:
    """A dead store's 0 does not outlive a reload to one that works: the gauge is the serving store's."""
    dead = {"max_requests": 3, "storage": f"redis://127.0.0.1:{free_port()}/0", "on_storage_error": "allow"}
    config = base_config(upstream, rate_limit=dead)
    gw = GatewayProcess(config, tmp_path)
    admin = f"http://127.0.0.1:{gw.admin_port}"
    try:
        assert value(await scrape(admin), "bt_gateway_rate_limit_storage_up") == 0
        edit(gw, {**config, "rate_limit": {"max_requests": 3}})  # back to process memory
        assert (await post_reload(gw))[0] == 200
        assert value(await scrape(admin), "bt_gateway_rate_limit_storage_up") == 1
    finally:
        assert gw.stop() == 0


async def test_a_reload_keeping_the_store_does_not_check_it_again(tmp_path: Path, upstream: Upstream) -> None:
    """The store serving now is taken over as it is (its health goes on reporting an outage): an unrelated
    reload neither waits for a start-up check of it nor says again that it is unreachable."""
    redis = RedisServer(tmp_path)
    try:
        config = base_config(upstream, rate_limit={"storage": redis.url, "on_storage_error": "allow"})
        gw = GatewayProcess(config, tmp_path)
        try:
            assert await statuses(gw, "/x", 1) == [200]
            redis.stop()  # down from now on
            edit(gw, {**config, "deny_paths": ["/nothing/**"]})  # an unrelated change
            status, body = await post_reload(gw)
            assert (status, body["status"]) == (200, "reloaded"), body
            notices = [e for e in gw.events("rate_limit_storage_unavailable") if "unreachable now" in str(e)]
            assert notices == []
        finally:
            assert gw.stop() == 0
    finally:
        redis.stop()
