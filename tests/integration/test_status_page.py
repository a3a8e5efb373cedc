"""`GET /status` on the admin listener, rendered by headless Chromium after a known mix of traffic, and the
`/status.json` it reads: exact figures, nothing fetched from anywhere else, a strict CSP, no raw token."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config.load import load_config
from gateway.config.redact import config_sha256
from gateway.policy.credentials import fingerprint
from tests.clients import (
    HANG_GUARD_S,
    Rendered,
    free_port,
    get,
    headless_chromium,
    raw_connect,
    scrape,
    send_raw,
    value,
)
from tests.conftest import GatewayFactory, Upstream, route_to
from tests.gateway_process import GatewayProcess
from tests.tools import require_binaries

TOKEN_A, TOKEN_B, TOKEN_C = "sk-status-page-a-secret", "sk-status-page-b-secret", "sk-status-page-c-secret"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "status.png"


def traffic_config(upstream: Upstream) -> dict[str, Any]:
    """Two routes to one upstream: `uploads` holds what is over its limit (`on_limit: delay`), `app` refuses
    it; tunnels to the upstream's port are allowed."""
    return {
        "allowlist": [f"127.0.0.1:{upstream.port}"],
        "routes": [
            {
                "name": "uploads",
                "prefix": "/uploads",
                "upstream": upstream.url,
                "rate_limit": {"max_requests": 1, "on_limit": "delay", "max_delay_s": 600},
            },
            {"name": "app", "prefix": "/", "upstream": upstream.url},
        ],
        "rate_limit": {"max_requests": 3, "window_minutes": 10},
        "forward_proxy": {"connect_ports": [upstream.port]},
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def known_mix(gateway_url: str, port: int, upstream: Upstream) -> AsyncIterator[asyncio.Task[Any]]:
    """Forwarded, rate-limited and egress-denied requests, then one upload held in the delay queue and
    one open tunnel, both kept open while the caller looks: 17 requests answered, 1 delayed, 1 tunnel."""
    async with aiohttp.ClientSession() as client:
        for token, times in ((TOKEN_A, 5), (TOKEN_B, 7)):  # 3 forwarded each, then 2 and 4 refused (429)
            for _ in range(times):
                async with client.get(gateway_url + "/v1/rows", headers=bearer(token)) as resp:
                    await resp.read()
        async with client.post(gateway_url + "/uploads/1", data=b"x" * 10, headers=bearer(TOKEN_C)) as resp:
            assert resp.status == 200
    for host in ("evil.example", "evil.example", "evil.example", "exfil.example"):
        denied = await send_raw(port, f"GET http://{host}/steal HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert denied.status == 403

    async def held_upload() -> None:
        async with aiohttp.ClientSession() as client:
            await client.post(gateway_url + "/uploads/2", data=b"x" * 10, headers=bearer(TOKEN_C))

    upload = asyncio.get_running_loop().create_task(held_upload())
    try:
        async with raw_connect(port, f"127.0.0.1:{upstream.port}") as (answer, _, _):
            assert answer.status == 200
            yield upload
    finally:
        upload.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upload


async def delayed_gauge(admin_url: str, expected: float) -> None:
    """Wait until the scrape shows `expected` requests held for a slot (a hang guard, not a timing)."""
    async with asyncio.timeout(HANG_GUARD_S):
        while value(await scrape(admin_url), "bt_gateway_rate_limit_queued") != expected:
            await asyncio.sleep(0.02)


def inline(html: str, tag: str) -> str:
    return html.partition(f"<{tag}>")[2].partition(f"</{tag}>")[0]


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


async def test_the_page_shows_a_known_mix_in_a_real_browser(tmp_path: Path, upstream: Upstream) -> None:
    binaries = require_binaries("chromium")
    gw = GatewayProcess(traffic_config(upstream), tmp_path)
    try:
        async with known_mix(gw.url, gw.port, upstream):
            admin = f"http://127.0.0.1:{gw.admin_port}"
            await delayed_gauge(admin, 1)
            async with aiohttp.ClientSession() as client, client.post(admin + "/reload") as resp:
                assert resp.status == 200
            async with headless_chromium(binaries["chromium"], tmp_path / "profile") as browser:
                page = await browser.open(admin + "/status")
                # two refreshes: the page reads status.json again by itself, and the figures have settled
                # (the closed client connections are gone)
                await page.wait_for("document.body && Number(document.body.dataset.refreshes) >= 2")
                await page.wait_for("document.getElementById('conn-clients').textContent === '2'")
                dom = await page.dom()
                shot = tmp_path / "status.png"
                await page.screenshot(shot)
    finally:
        gw.stop()

    assert_figures(dom, gw)
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    status_json = [url for url in page.requests if url == admin + "/status.json"]
    assert len(status_json) >= 2
    assert set(page.requests) == {admin + "/status", admin + "/status.json"}
    assert page.log == []  # no CSP violation, no failed load, no script error
    if os.environ.get("UPDATE_DOCS_SCREENSHOT"):  # `make docs-screenshot`: the README's picture, from a pass
        shutil.copyfile(shot, DOCS_SCREENSHOT)


def assert_figures(dom: Rendered, gw: GatewayProcess) -> None:
    """Every figure of the known mix, as the page rendered it."""
    text = dom.texts
    digest = config_sha256(load_config(gw.config_path).config)
    assert text["gen-config"] == str(gw.config_path)
    assert (text["gen-sha256"], dom.attributes["gen-sha256"]["title"]) == (digest[:16], digest)
    assert text["gen-reload"].startswith("ok at ")
    assert text["rps-total"] == "17"
    chart = dom.html.partition('id="rps-chart"')[2].partition("</svg>")[0]
    assert "<polyline" in chart and "req/s" in chart
    assert dom.tables["refusals"] == [["egress_denied", "4"], ["rate_limited", "6"]]
    assert dom.tables["denied-hosts"] == [["evil.example", "3", "0"], ["exfil.example", "1", "0"]]
    assert dom.tables["limited-tokens"] == [
        [fingerprint(TOKEN_B), "4", "0"],
        [fingerprint(TOKEN_A), "2", "0"],
    ]
    logged = {e["token_fp"] for e in gw.events("access") if e["status"] == 429}
    assert logged == {fingerprint(TOKEN_A), fingerprint(TOKEN_B)}  # the page names tokens as the log does
    for token in (TOKEN_A, TOKEN_B, TOKEN_C):
        assert token not in dom.html
    assert (text["conn-clients"], text["conn-tunnels"], text["delayed"]) == ("2", "1", "1")
    assert (text["rl-storage"], text["rl-uri"], text["rl-state"]) == ("memory", "memory://", "up, counting")
    assert text["rl-on-error"] == "allow (fail open)"
    routes = {row[0]: row for row in dom.tables["routes"]}
    assert set(routes) == {"uploads", "app"}
    for name, answered in (("uploads", "1"), ("app", "6")):
        _, upstream_url, last, observed, *percentiles = routes[name]
        assert (upstream_url.startswith("http://127.0.0.1:"), last, observed) == (True, "200", answered)
        assert [p.endswith(" ms") for p in percentiles] == [True, True, True]


async def test_status_json_has_exact_figures_and_the_page_a_strict_policy(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**traffic_config(upstream))
    async with known_mix(gw.url, gw.gateway.ports["listen"], upstream):
        await delayed_gauge(gw.admin_url, 1)
        async with aiohttp.ClientSession() as client:
            async with client.get(gw.admin_url + "/status.json") as resp:
                assert resp.headers["Cache-Control"] == "no-store"
                status = await resp.json()
            async with client.get(gw.admin_url + "/status") as resp:
                assert resp.status == 200
                html, headers = await resp.text(), resp.headers
    assert status["requests"]["total"] == 17
    assert status["refusals"] == {"egress_denied": 4, "rate_limited": 6}
    assert status["denied_hosts"] == [
        {"host": "evil.example", "count": 3, "error": 0},
        {"host": "exfil.example", "count": 1, "error": 0},
    ]
    assert status["rate_limited_tokens"] == [
        {"fingerprint": fingerprint(TOKEN_B), "count": 4, "error": 0},
        {"fingerprint": fingerprint(TOKEN_A), "count": 2, "error": 0},
    ]
    assert status["delayed_requests"] == 1
    assert status["would_refuse"] == {}  # enforce mode
    assert status["connections"]["tunnels"] == 1
    assert status["rate_limit"] == {
        "storage": "memory",
        "uri": "memory://",
        "up": True,
        "on_storage_error": "allow",
        "state": "counting",
    }
    assert [(r["name"], r["last_status"], r["observed"]) for r in status["routes"]] == [
        ("uploads", "200", 1),
        ("app", "200", 6),
    ]
    assert status["generation"]["sha256"] == config_sha256(gw.gateway.config)
    assert status["generation"]["last_reload"] is None
    policy = headers["Content-Security-Policy"]
    assert policy == (
        f"default-src 'none'; script-src {csp_hash(inline(html, 'script'))}; "
        f"style-src {csp_hash(inline(html, 'style'))}; connect-src 'self'; img-src data:; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    )
    assert "unsafe" not in policy
    assert (headers["Content-Type"], headers["X-Content-Type-Options"]) == (
        "text/html; charset=utf-8",
        "nosniff",
    )
    for source in ("src=", "href=", "@import", "url("):  # nothing external: the one link is the data: icon
        assert html.count(source) == (1 if source == "href=" else 0), source
    assert 'href="data:,"' in html


async def test_the_delay_queue_gauge_counts_requests_held_and_released(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**traffic_config(upstream))
    assert value(await scrape(gw.admin_url), "bt_gateway_rate_limit_queued") == 0
    async with known_mix(gw.url, gw.gateway.ports["listen"], upstream) as upload:
        await delayed_gauge(gw.admin_url, 1)
        upload.cancel()  # the client leaves: its place in the queue is freed
        await delayed_gauge(gw.admin_url, 0)


@pytest.mark.parametrize(("on_error", "state"), [("allow", "failing open"), ("deny", "failing closed")])
async def test_a_dead_redis_store_shows_down_and_how_requests_fare(
    start_gateway: GatewayFactory, upstream: Upstream, on_error: str, state: str
) -> None:
    storage = f"redis://:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there
    rate_limit = {"storage": storage, "on_storage_error": on_error}
    gw = await start_gateway(**route_to(upstream, rate_limit=rate_limit))
    errors = "bt_gateway_rate_limit_storage_errors_total"
    before = value(await scrape(gw.admin_url), errors)  # the start-up check's own
    async with aiohttp.ClientSession() as client, client.get(gw.admin_url + "/status.json") as resp:
        status = await resp.json()
    assert status["rate_limit"] == {
        "storage": "redis",
        "uri": f"redis://:***@127.0.0.1:{storage.rsplit(':', 1)[1]}",
        "up": False,
        "on_storage_error": on_error,
        "state": state,
    }
    assert value(await scrape(gw.admin_url), errors) == before  # a look at the page is no failed call


async def test_the_generation_follows_reloads_and_a_failed_one_is_shown_with_its_problems(
    tmp_path: Path, upstream: Upstream
) -> None:
    gw = GatewayProcess(route_to(upstream), tmp_path)
    admin = f"http://127.0.0.1:{gw.admin_port}"
    try:
        async with aiohttp.ClientSession() as client:

            async def look() -> dict[str, Any]:
                async with client.get(admin + "/status.json") as resp:
                    return (await resp.json())["generation"]

            async def reload() -> int:
                async with client.post(admin + "/reload") as resp:
                    return resp.status

            started = await look()
            gw.config_path.write_text(gw.config_path.read_text() + "rate_limit: {max_requests: -1}\n")
            assert await reload() == 422
            failed = await look()
            gw.config_path.write_text(gw.config_path.read_text().replace("-1", "7"))
            assert await reload() == 200
            reloaded = await look()
    finally:
        gw.stop()
    assert started["sha256"] == failed["sha256"] != reloaded["sha256"]
    assert reloaded["sha256"] == config_sha256(load_config(gw.config_path).config)
    assert started["last_reload"] is None
    assert failed["last_reload"]["ok"] is False
    [problem] = failed["last_reload"]["problems"]
    assert "rate_limit.max_requests" in problem
    assert reloaded["last_reload"]["ok"] is True
    assert reloaded["config"] == str(gw.config_path)


async def test_report_modes_would_refuse_counts_are_on_the_page(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**route_to(upstream), mode="report", deny_paths=["/admin/**"])
    for _ in range(2):
        assert (await get(gw.gateway.ports["listen"], "/admin/users")).status == 200  # let through
    async with aiohttp.ClientSession() as client, client.get(gw.admin_url + "/status.json") as resp:
        status = await resp.json()
    assert status["would_refuse"] == {"deny_paths/path_denied": 2}


async def test_a_sentinel_store_of_several_hosts_is_shown_masked(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    """The usual production form lists several sentinels: one URI, many hosts, its password masked."""
    ports = (free_port(), free_port())  # nothing listens there
    storage = f"redis+sentinel://:hunter2@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/mymaster"
    gw = await start_gateway(**route_to(upstream, rate_limit={"storage": storage}))
    async with aiohttp.ClientSession() as client, client.get(gw.admin_url + "/status.json") as resp:
        assert resp.status == 200
        status = await resp.json()
    assert (status["rate_limit"]["storage"], status["rate_limit"]["up"]) == ("redis+sentinel", False)
    assert (
        status["rate_limit"]["uri"]
        == f"redis+sentinel://:***@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/mymaster"
    )
