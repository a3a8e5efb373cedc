"""One access event per request, with a token fingerprint and never the token itself."""

from __future__ import annotations

import hashlib
from pathlib import Path

import aiohttp

from tests.clients import send_raw
from tests.conftest import Upstream
from tests.gateway_process import GatewayProcess

TOKEN = "sk-live-THISMUSTNEVERAPPEARINLOGS0123456789"


async def test_access_events_carry_fingerprint_not_secrets(tmp_path: Path, upstream: Upstream) -> None:
    host = upstream.url.split("://")[1]
    gw = GatewayProcess(
        {"allowlist": [host], "routes": [{"name": "app", "prefix": "/", "upstream": upstream.url}]},
        tmp_path,
    )
    try:
        async with aiohttp.ClientSession() as client:
            headers = {"Authorization": f"Bearer {TOKEN}", "Cookie": f"session={TOKEN}"}
            async with client.post(gw.url + "/v1/x?api_key=abc", headers=headers, data=b"12345") as resp:
                assert resp.status == 200
            async with client.get(gw.url + "/status/503", headers={"Authorization": TOKEN}) as resp:
                assert resp.status == 503
        await send_raw(gw.port, f"GET /x HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nBad\r\n\r\n".encode())
    finally:
        assert gw.stop() == 0
    everything = "".join(gw.raw_lines)
    assert TOKEN not in everything
    assert "api_key=abc" not in everything
    access = gw.events("access")
    assert len(access) == 2
    first, second = access
    fp = hashlib.sha256(TOKEN.encode()).hexdigest()[:12]
    assert first["token_fp"] == fp and second["token_fp"] == fp
    assert first["method"] == "POST" and first["path"] == "/v1/x" and first["route"] == "app"
    assert first["status"] == 200 and first["bytes_in"] == 5 and first["bytes_out"] > 0
    assert first["upstream_host"] == "127.0.0.1"
    assert isinstance(first["duration_ms"], float)
    assert len(first["request_id"]) == 32
    assert second["status"] == 503
    assert gw.events("request_rejected")  # the malformed request was logged, without its header
