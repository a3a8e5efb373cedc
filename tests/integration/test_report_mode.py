"""`mode: report` through the real gateway on YAML configs: what each policy step would refuse goes on,
logged once as `would_refuse` and counted exactly; what guards the gateway itself is refused all the same."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from gateway.policy.proxyauth import hash_password
from tests.clients import HANG_GUARD_S, assert_error, get, raw_connect, read_reply, scrape, send_raw, value
from tests.conftest import Logs, RunningGateway, Upstream, YamlGatewayFactory
from tests.gateway_process import GatewayProcess

TOKEN = "sk-report-mode-token-0123456789"


def config(upstream: Upstream, extra: str = "", *, mode: str = "report") -> str:
    """A gateway in `mode` routing everything to `upstream`, with only 127.0.0.1 on the allow-list."""
    return (
        f"mode: {mode}\n"
        'allowlist: ["127.0.0.1"]\n'
        f"routes:\n  - {{name: app, prefix: /, upstream: '{upstream.url}'}}\n"
        f"{extra}"
    )


async def assert_reported(
    gw: RunningGateway, logs: Logs, path: str, step: str, reason: str, code: str, status: int
) -> None:
    """The request to `path` ended, its access event shows `step:would_refuse`, one `would_refuse` event
    says what enforce mode would have sent, and that is the only would-refuse the metrics counted."""
    access = await logs.access(path)
    assert f"{step}:would_refuse" in access["decisions"]
    [event] = logs.named("would_refuse")
    assert (event["step"], event["reason"], event["code"], event["status"]) == (step, reason, code, status)
    assert event["request_id"] == access["request_id"]
    samples = await scrape(gw.admin_url)
    name = "bt_gateway_would_refuse_total"
    assert value(samples, name, step=step, reason=reason) == 1
    assert sum(v for (n, _), v in samples.items() if n == name) == 1
    assert gw.gateway.metrics.would_refuse == {(step, reason): 1}


async def test_allowlist_reports_a_host_off_the_list(
    start_yaml: YamlGatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    gw = await start_yaml(config(upstream, f"forward_proxy: {{http_ports: [{upstream.port}]}}\n"))
    target = f"http://localhost:{upstream.port}/listed-by-address-only"
    reply = await get(gw.gateway.ports["listen"], target, f"Host: localhost:{upstream.port}\r\n")
    assert reply.status == 200
    assert [seen.raw_path for seen in upstream.recorder.requests] == ["/listed-by-address-only"]
    await assert_reported(gw, logs, target, "allowlist", "host_not_allowed", "egress_denied", 403)


async def test_deny_paths_reports_a_denied_path(
    start_yaml: YamlGatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    gw = await start_yaml(config(upstream, "deny_paths: ['/admin/**']\n"))
    reply = await get(gw.gateway.ports["listen"], "/admin/users")
    assert reply.status == 200
    assert upstream.recorder.requests[0].raw_path == "/admin/users"
    await assert_reported(gw, logs, "/admin/users", "deny_paths", "path_denied", "path_denied", 403)


async def test_rate_limit_reports_still_counts_and_sends_its_fields(
    start_yaml: YamlGatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    gw = await start_yaml(config(upstream, "rate_limit: {max_requests: 1, window_minutes: 1}\n"))
    port = gw.gateway.ports["listen"]
    auth = f"Host: gw\r\nAuthorization: Bearer {TOKEN}\r\n"
    first = await get(port, "/first", auth)
    second = await get(port, "/second", auth)
    assert (first.status, second.status) == (200, 200)
    assert len(upstream.recorder.requests) == 2
    assert first.headers["RateLimit"].startswith('"default";r=0;t=')
    assert second.headers["RateLimit"].startswith('"default";r=0;t=')  # counted: nothing left
    assert "Retry-After" not in second.headers
    assert "ratelimit:allow" in (await logs.access("/first"))["decisions"]
    await assert_reported(gw, logs, "/second", "ratelimit", "rate_limited", "rate_limited", 429)


async def test_method_check_reports_trace(
    start_yaml: YamlGatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    gw = await start_yaml(config(upstream))
    reply = await send_raw(gw.gateway.ports["listen"], b"TRACE /echo HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert reply.status == 200
    assert [(seen.method, seen.raw_path) for seen in upstream.recorder.requests] == [("TRACE", "/echo")]
    await assert_reported(gw, logs, "/echo", "method", "method_not_allowed", "method_not_allowed", 405)


async def test_forward_proxy_ports_report_a_port_off_http_ports(
    start_yaml: YamlGatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    gw = await start_yaml(config(upstream))  # http_ports: [80], the default
    target = f"{upstream.url}/off-port"
    reply = await get(gw.gateway.ports["listen"], target, f"Host: 127.0.0.1:{upstream.port}\r\n")
    assert reply.status == 200
    assert upstream.recorder.requests[0].raw_path == "/off-port"
    await assert_reported(gw, logs, target, "forward_proxy", "port_not_allowed", "egress_denied", 403)


async def test_tunnel_policy_reports_a_port_off_connect_ports(
    start_yaml: YamlGatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    gw = await start_yaml(config(upstream))  # connect_ports: [443], the default
    target = f"127.0.0.1:{upstream.port}"
    async with raw_connect(gw.gateway.ports["listen"], target) as (answer, reader, writer):
        assert answer.status == 200
        writer.write(b"GET /tunnelled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await read_reply(reader)).status == 200
    await assert_reported(gw, logs, target, "forward_proxy", "port_not_allowed", "egress_denied", 403)


async def test_tunnel_rate_limit_reports_the_tunnel_over_it(
    start_yaml: YamlGatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    extra = f"forward_proxy: {{connect_ports: [{upstream.port}], rate_limit: {{max_tunnels: 1}}}}\n"
    gw = await start_yaml(config(upstream, extra))
    target = f"127.0.0.1:{upstream.port}"
    for _ in range(2):
        async with raw_connect(gw.gateway.ports["listen"], target) as (answer, _, _):
            assert answer.status == 200
    async with asyncio.timeout(HANG_GUARD_S):
        while len(logs.named("access")) < 2:
            await asyncio.sleep(0.01)
    first, second = (event["decisions"] for event in logs.named("access"))
    assert ("tunnel_limit:allow" in first, "tunnel_limit:would_refuse" in second) == (True, True)
    [event] = logs.named("would_refuse")
    assert (event["step"], event["reason"], event["status"]) == ("tunnel_limit", "rate_limited", 429)
    assert gw.gateway.metrics.would_refuse == {("tunnel_limit", "rate_limited"): 1}


async def test_enforce_mode_refuses_and_reports_nothing(
    start_yaml: YamlGatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    gw = await start_yaml(config(upstream, "deny_paths: ['/admin/**']\n", mode="enforce"))
    assert_error(await get(gw.gateway.ports["listen"], "/admin/users"), 403, "path_denied")
    assert "deny_paths:deny" in (await logs.access("/admin/users"))["decisions"]
    assert (logs.named("would_refuse"), upstream.recorder.requests) == ([], [])
    samples = await scrape(gw.admin_url)
    assert not [name for name, _ in samples if name.startswith("bt_gateway_would_refuse")]


@pytest.mark.parametrize(("top", "route"), [("enforce", "report"), ("report", "enforce")])
async def test_a_route_mode_wins_over_the_top_level_one(
    start_yaml: YamlGatewayFactory, upstream: Upstream, logs: Logs, top: str, route: str
) -> None:
    gw = await start_yaml(
        f"mode: {top}\n"
        'allowlist: ["127.0.0.1"]\n'
        "deny_paths: ['/**/secret']\n"
        "routes:\n"
        f"  - {{name: own, prefix: /own, upstream: '{upstream.url}', mode: {route}}}\n"
        f"  - {{name: app, prefix: /, upstream: '{upstream.url}'}}\n"
    )
    port = gw.gateway.ports["listen"]
    reported, refused = (
        ("/own/secret", "/other/secret") if route == "report" else ("/other/secret", "/own/secret")
    )
    assert (await get(port, reported)).status == 200
    assert_error(await get(port, refused), 403, "path_denied")
    assert len(upstream.recorder.requests) == 1
    await assert_reported(gw, logs, reported, "deny_paths", "path_denied", "path_denied", 403)


# Never relaxed: each is refused in report mode exactly as in enforce mode.


async def test_private_addresses_stay_out_of_reach(
    start_yaml: YamlGatewayFactory, private_upstream: Upstream, logs: Logs
) -> None:
    """An IP literal, a name that resolves there and a tunnel: report mode lets the allow-list's refusal
    go, and the address check where the connection is made refuses all three."""
    ports = f"[{private_upstream.port}]"
    gw = await start_yaml(
        "mode: report\n"
        'allowlist: ["127.0.0.1"]\n'
        "routes: [{name: app, prefix: /, upstream: 'http://127.0.0.1:9'}]\n"
        f"forward_proxy: {{http_ports: {ports}, connect_ports: {ports}}}\n"
        "resolve: {internal.test: 127.0.0.2}\n"
    )
    port = gw.gateway.ports["listen"]
    for host in ("127.0.0.2", "internal.test"):
        url = f"http://{host}:{private_upstream.port}/internal"
        reply = await get(port, url, f"Host: {host}:{private_upstream.port}\r\n")
        assert_error(reply, 403, "egress_denied")
        assert (await logs.access(url))["reason"] == "private_address"
    async with raw_connect(port, f"127.0.0.2:{private_upstream.port}") as (answer, _, _):
        assert_error(answer, 403, "egress_denied")
    assert private_upstream.recorder.requests == []
    assert gw.gateway.metrics.would_refuse == {
        ("allowlist", "host_not_allowed"): 2,
        ("forward_proxy", "host_not_allowed"): 1,
    }


async def test_malformed_and_smuggled_requests_are_refused(
    start_yaml: YamlGatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    gw = await start_yaml(config(upstream))
    port = gw.gateway.ports["listen"]
    assert_error(await get(port, "/bad-host", "Host: a b\r\n"), 400, "bad_host")
    two = f"Host: gw\r\nAuthorization: Bearer {TOKEN}\r\nAuthorization: Bearer other-token-0123456789\r\n"
    assert_error(await get(port, "/two-tokens", two), 400, "ambiguous_credentials")
    assert_error(await get(port, "ftp://127.0.0.1/x", "Host: gw\r\n"), 400, "bad_request")
    smuggled = (
        b"POST /s HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert (await send_raw(port, smuggled)).status == 400
    assert_error(
        await send_raw(port, b"CONNECT 127.0.0.1 HTTP/1.1\r\nHost: x\r\n\r\n"), 400, "bad_connect_target"
    )
    assert (upstream.recorder.requests, logs.named("would_refuse")) == ([], [])


async def test_size_and_time_bounds_are_kept(
    start_yaml: YamlGatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    gw = await start_yaml(
        config(upstream, "limits: {max_body_mb: 0.001, max_header_kb: 2, header_timeout_s: 0.3}\n")
    )
    port = gw.gateway.ports["listen"]
    big_body = b"POST /up HTTP/1.1\r\nHost: gw\r\nContent-Length: 2000\r\nConnection: close\r\n\r\n"
    assert_error(await send_raw(port, big_body), 413, "body_too_large")
    filler = "".join(f"X-Filler-{i}: {'v' * 500}\r\n" for i in range(5))
    assert_error(await get(port, "/big-head", f"Host: gw\r\n{filler}"), 431, "headers_too_large")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: gw\r\n")  # the head never ends
    assert_error(await read_reply(reader), 408, "request_timeout")
    writer.close()
    assert (upstream.recorder.requests, logs.named("would_refuse")) == ([], [])


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_proxy_auth_is_required(start_yaml: YamlGatewayFactory, upstream: Upstream, logs: Logs) -> None:
    user_hash = hash_password("the-password", log2_n=10)
    ports = f"[{upstream.port}]"
    extra = (
        f"forward_proxy:\n  http_ports: {ports}\n  connect_ports: {ports}\n"
        f"  auth: {{users: {{ana: '{user_hash}'}}}}\n"
    )
    gw = await start_yaml(config(upstream, extra))
    port = gw.gateway.ports["listen"]
    target = f"127.0.0.1:{upstream.port}"
    for wrong in ("", f"Proxy-Authorization: {basic('ana', 'wrong')}\r\n"):
        assert_error(
            await get(port, f"http://{target}/x", f"Host: {target}\r\n{wrong}"), 407, "proxy_auth_required"
        )
        async with raw_connect(port, target, wrong) as (answer, _, _):
            assert_error(answer, 407, "proxy_auth_required")
    assert (upstream.recorder.requests, gw.gateway.tunnels.opened, logs.named("would_refuse")) == ([], 0, [])
    right = f"Proxy-Authorization: {basic('ana', 'the-password')}\r\n"
    assert (await get(port, f"http://{target}/x", f"Host: {target}\r\n{right}")).status == 200


async def test_relay_links_are_verified(
    start_yaml: YamlGatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    secret = "relay-secret-for-report-mode-0123456789"
    gw = await start_yaml(config(upstream, f"relay: {{allow_hosts: [store.test], secret: {secret}}}\n"))
    port = gw.gateway.ports["listen"]
    for link in ("/_relay/forged", "/_relay/eyJ1IjoiaHR0cHM6Ly9zdG9yZS50ZXN0L2sifQ.AAAA"):
        assert_error(await get(port, link), 403, "relay_denied")
    assert (upstream.recorder.requests, logs.named("would_refuse")) == ([], [])


async def test_serve_says_so_at_start_and_logs_each_would_refuse_once(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = {
        "mode": "report",
        "allowlist": ["127.0.0.1"],
        "routes": [{"name": "app", "prefix": "/", "upstream": upstream.url}],
        "deny_paths": ["/admin/**"],
    }
    gw = await asyncio.to_thread(GatewayProcess, config, tmp_path)
    try:
        notice = await gw.event("report_mode")  # logged just after gateway_started
        assert (notice["key"], notice["routes"]) == ("mode", ["app"])
        assert (await get(gw.port, "/admin/users")).status == 200
        await gw.event("access")
        [event] = gw.events("would_refuse")
        assert (event["step"], event["reason"], event["status"], event["path"]) == (
            "deny_paths",
            "path_denied",
            403,
            "/admin/users",
        )
        samples = await scrape(f"http://127.0.0.1:{gw.admin_port}")
        assert value(samples, "bt_gateway_would_refuse_total", step="deny_paths", reason="path_denied") == 1
    finally:
        gw.stop()
