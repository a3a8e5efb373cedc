"""The audit log through the real CLI: Braintrust's audit headers asked for, decoded, written per request."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Upstream
from tests.gateway_process import GatewayProcess
from tests.upstream_app import AUDITED_RESOURCES, BAD_AUDIT

TOKEN = "sk-audit-token-never-written"


def audit_config(upstream: Upstream, sink: Path, expose: str = "auto") -> dict[str, Any]:
    host = upstream.url.split("://")[1]
    return {
        "allowlist": [host],
        "routes": [{"name": "app", "prefix": "/", "upstream": upstream.url}],
        "audit": {"enabled": True, "sink": str(sink), "expose_to_client": expose},
    }


def events(sink: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in sink.read_text().splitlines()]


async def fetch(gw: GatewayProcess, path: str, **headers: str) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as client:
        headers = {"Authorization": f"Bearer {TOKEN}", **headers}
        async with client.get(gw.url + path, headers=headers) as resp:
            await resp.read()
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}


async def test_every_request_gets_one_audit_event_with_decoded_resources(
    tmp_path: Path, upstream: Upstream
) -> None:
    sink = tmp_path / "audit.jsonl"
    gw = GatewayProcess(audit_config(upstream, sink), tmp_path)
    try:
        status, headers = await fetch(gw, "/v1/project/p-1")
        assert status == 200
        assert not [h for h in headers if h.startswith("x-bt-audit-")]  # auto: the client did not ask
    finally:
        assert gw.stop() == 0
    seen = dict(upstream.recorder.requests[0].headers)
    assert seen["x-bt-enable-audit"] == "true"  # asked of the upstream
    [event] = events(sink)
    assert event["user_id"] == "u-1" and event["user_email"] == "alice@example.com"
    assert event["normalized_url"] == "/v1/project/[id]"
    assert event["resources"] == AUDITED_RESOURCES
    assert (event["method"], event["route"], event["status"]) == ("GET", "app", 200)
    assert event["decisions"] == ["route:app", "allowlist:allow", "ratelimit:allow", "rewrite:passthrough"]
    assert len(event["token_fp"]) == 12 and TOKEN not in sink.read_text()


@pytest.mark.parametrize(
    ("expose", "client_asks", "shown"),
    [("auto", True, True), ("auto", False, False), ("always", False, True), ("never", True, False)],
)
async def test_clients_see_audit_headers_only_as_configured(
    tmp_path: Path, upstream: Upstream, expose: str, client_asks: bool, shown: bool
) -> None:
    gw = GatewayProcess(audit_config(upstream, tmp_path / "a.jsonl", expose), tmp_path)
    try:
        asked = {"x-bt-enable-audit": "true"} if client_asks else {}
        status, headers = await fetch(gw, "/v1/x", **asked)
    finally:
        assert gw.stop() == 0
    assert status == 200
    assert ("x-bt-audit-user-id" in headers) is shown


@pytest.mark.parametrize("sent", ["false", "true"])
async def test_the_upstream_is_asked_for_audit_headers_once_whatever_the_client_sent(
    tmp_path: Path, upstream: Upstream, sent: str
) -> None:
    """The gateway's own `x-bt-enable-audit: true` replaces the client's field: a client's `false` cannot
    switch the audit off, nor a `true` arrive twice."""
    sink = tmp_path / "audit.jsonl"
    gw = GatewayProcess(audit_config(upstream, sink), tmp_path)
    try:
        status, _ = await fetch(gw, "/v1/project/p-1", **{"X-Bt-Enable-Audit": sent})
    finally:
        assert gw.stop() == 0
    assert status == 200
    asked = [
        value for name, value in upstream.recorder.requests[0].headers if name.lower() == "x-bt-enable-audit"
    ]
    assert asked == ["true"]
    [event] = events(sink)
    assert event["user_id"] == "u-1"


@pytest.mark.parametrize("path", sorted(BAD_AUDIT))
async def test_malformed_audit_headers_are_recorded_and_harm_nothing(
    tmp_path: Path, upstream: Upstream, path: str
) -> None:
    sink = tmp_path / "audit.jsonl"
    gw = GatewayProcess(audit_config(upstream, sink), tmp_path)
    try:
        assert (await fetch(gw, path))[0] == 200
    finally:
        assert gw.stop() == 0
    [event] = events(sink)
    assert event["resources"] is None
    assert event["audit_decode_error"]
    assert event["user_id"] == "u-1"  # the well-formed fields are still kept


async def test_refused_requests_are_audited_too(tmp_path: Path, upstream: Upstream) -> None:
    sink = tmp_path / "audit.jsonl"
    gw = GatewayProcess({**audit_config(upstream, sink), "rate_limit": {"max_requests": 1}}, tmp_path)
    try:
        assert [(await fetch(gw, "/x"))[0] for _ in range(2)] == [200, 429]
    finally:
        assert gw.stop() == 0
    assert [(e["status"], e["decisions"][-1]) for e in events(sink)] == [
        (200, "rewrite:passthrough"),
        (429, "ratelimit:deny"),
    ]


async def test_sighup_reopens_a_rotated_audit_file(tmp_path: Path, upstream: Upstream) -> None:
    """logrotate renames the file, then sends SIGHUP: the next events go to a new file of the old name,
    whether the config reloads (a new generation opens it) or fails to (the running one reopens it)."""
    sink = tmp_path / "audit.jsonl"
    gw = GatewayProcess(audit_config(upstream, sink), tmp_path)
    try:
        await fetch(gw, "/x", **{"X-Request-Id": "first"})
        sink.rename(tmp_path / "audit.jsonl.1")
        gw.signal(signal.SIGHUP)
        await gw.event("config_reloaded")
        await fetch(gw, "/x", **{"X-Request-Id": "second"})
        sink.rename(tmp_path / "audit.jsonl.2")
        gw.config_path.write_text(gw.config_path.read_text() + "unknown_key: 1\n")
        gw.signal(signal.SIGHUP)
        await gw.event("config_reload_failed")
        await fetch(gw, "/x", **{"X-Request-Id": "third"})
    finally:
        assert gw.stop() == 0
    assert [e["request_id"] for e in events(tmp_path / "audit.jsonl.1")] == ["first"]
    assert [e["request_id"] for e in events(tmp_path / "audit.jsonl.2")] == ["second"]
    assert [e["request_id"] for e in events(sink)] == ["third"]
