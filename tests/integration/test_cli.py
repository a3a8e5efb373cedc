"""The real CLI: `check-config` errors and exit codes, `serve` as a subprocess, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Upstream
from tests.gateway_process import GatewayProcess

GOOD = """\
allowlist: [www.braintrust.dev, braintrust.dev]
routes:
  - {name: app, prefix: /, upstream: https://www.braintrust.dev}
"""


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60, env=env
    )


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            GOOD + "listn: {port: 1}\n",
            "listn (line 4): unknown key",
        ),
        (
            "routes:\n  - {name: app, prefix: /, upstream: 'ftp://www.braintrust.dev'}\n",
            "routes[0].upstream (line 2): must be an http:// or https:// URL, got 'ftp://www.braintrust.dev'",
        ),
        (
            "routes:\n  - {name: app, prefix: /, upstream: https://www.braintrust.dev}\n"
            "  - {name: data, prefix: /d, upstream: https://api.evil.com}\n",
            "routes[1].upstream (line 3): host 'api.evil.com' is not on the allowlist",
        ),
        (
            "listen:\n  port: eighty\n",
            "listen.port (line 2): Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            "allowlist: ['*braintrust.dev']\n",
            "allowlist[0] (line 1): '*braintrust.dev': a wildcard must be a whole leading label, as in "
            "*.example.com",
        ),
        ("listen: [1, 2\n", "config (line 2): invalid YAML: expected ',' or ']', but got '<stream end>'"),
    ],
)
def test_check_config_reports_one_line_per_problem_and_exits_2(
    tmp_path: Path, yaml_text: str, expected: str
) -> None:
    result = run_cli("check-config", "-c", write(tmp_path, yaml_text))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"bt-gateway: config error: {expected}"]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_check_config_env_errors_name_the_variable(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "BRAINTRUST_APP_URL": "https://evil.example",
        "BT_GATEWAY_LISTEN_PORT": "x",
    }
    result = run_cli("check-config", "-c", write(tmp_path, GOOD), env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "bt-gateway: config error: listen.port (env BT_GATEWAY_LISTEN_PORT): "
        "Input should be a valid integer, unable to parse string as an integer",
    ]


def test_check_config_prints_effective_config_with_precedence(tmp_path: Path) -> None:
    text = GOOD + "listen: {port: 7000}\nupstream: {proxy: 'http://user:hunter2@proxy.corp:3128'}\n"
    env = {
        "PATH": "/usr/bin:/bin",
        "BT_GATEWAY_LISTEN_PORT": "7001",
        "BRAINTRUST_APP_URL": "https://braintrust.dev",
    }
    result = run_cli("check-config", "-c", write(tmp_path, text), "--listen-port", "7002", env=env)
    assert result.returncode == 0, result.stderr
    assert "port: 7002" in result.stdout  # flag beats env beats YAML
    assert "upstream: https://braintrust.dev" in result.stdout  # env overrides the app route
    assert "hunter2" not in result.stdout
    assert "http://user:***@proxy.corp:3128" in result.stdout


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("bt-gateway ")


def test_missing_config_file_is_exit_2(tmp_path: Path) -> None:
    result = run_cli("serve", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert result.stderr.startswith("bt-gateway: config error: config: cannot read")


async def test_serve_subprocess_forwards_and_drains_on_sigterm(tmp_path: Path, upstream: Upstream) -> None:
    host = upstream.url.split("://")[1]
    gw = GatewayProcess(
        {
            "allowlist": [host],
            "routes": [{"name": "app", "prefix": "/", "upstream": upstream.url}],
            "shutdown_timeout_s": 10,
        },
        tmp_path,
    )
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{gw.admin_port}/readyz") as resp:
                assert resp.status == 200
            async with client.get(f"http://127.0.0.1:{gw.admin_port}/healthz") as resp:
                assert resp.status == 200
            # A request in flight when SIGTERM arrives must still complete.
            in_flight = asyncio.ensure_future(client.get(gw.url + "/sse"))
            while not upstream.recorder.requests:
                await asyncio.sleep(0.01)
            resp = await in_flight
            first = await resp.content.readuntil(b"\n\n")
            gw.terminate()
            await asyncio.sleep(0.3)
            with pytest.raises(aiohttp.ClientConnectionError):  # no longer accepting
                await client.get(gw.url + "/x")
            upstream.recorder.sse_gate.set()
            rest = await resp.content.read()
            assert first + rest == b"data: first\n\ndata: second\n\n"
            resp.release()
        assert await asyncio.to_thread(gw.wait) == 0
    finally:
        gw.stop()
    assert gw.events("gateway_draining")
    access = gw.events("access")
    assert [a["status"] for a in access] == [200]
