"""What `check-config` prints and `serve` logs about exposure: an open forward proxy, a shut POST /reload,
and that the admin token is never shown. Both commands give the same line for the same config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.policy.proxyauth import hash_password
from tests.clients import run_cli
from tests.gateway_process import GatewayProcess

TOKEN = "admin-token-fedcba9876543210"
APP = {"name": "app", "prefix": "/", "upstream": "https://www.braintrust.dev", "rate_limit": "off"}
NO_TUNNELS = {"allowlist": ["www.braintrust.dev"], "routes": [APP]}  # no rate-limited host to tunnel past
SHAPE = "must be at least 16 printable characters without spaces (e.g. openssl rand -hex 32)"
FORWARD_PROXY = (
    "forward_proxy is enabled on listen.host 0.0.0.0 without auth: anyone who reaches port 8080 can tunnel "
    "to the allow-listed hosts; set forward_proxy.auth, or forward_proxy.enabled: false, or listen.host: "
    "127.0.0.1"
)
ADMIN = (
    "admin.host 0.0.0.0 is not loopback and no admin.token is set: POST /reload answers 403 (SIGHUP and "
    "serve --watch still reload); set admin.token (env BT_GATEWAY_ADMIN_TOKEN) or admin.token_file to "
    "enable it"
)


def check(tmp_path: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """check-config on `config`: (stdout, stderr lines); it must succeed."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({**NO_TUNNELS, **config}))
    result = run_cli("check-config", "-c", str(path), env={"PATH": os.environ["PATH"], **(env or {})})
    assert result.returncode == 0, result.stderr
    *lines, ok = result.stderr.splitlines()
    assert ok == f"config ok: {path}"
    return result.stdout, lines


def test_an_open_forward_proxy_is_one_warning_line_before_config_ok(tmp_path: Path) -> None:
    _, lines = check(tmp_path, {"listen": {"host": "0.0.0.0", "port": 8080}})
    assert lines == [f"warning: {tmp_path / 'gateway.yaml'}: forward_proxy.auth: {FORWARD_PROXY}"]


@pytest.mark.parametrize(
    "config",
    [
        {"listen": {"host": "127.0.0.1", "port": 8080}},
        {"listen": {"host": "0.0.0.0", "port": 8080}, "forward_proxy": {"enabled": False}},
        {
            "listen": {"host": "0.0.0.0", "port": 8080},
            "forward_proxy": {"auth": {"users": {"alice": hash_password("pw", log2_n=10)}}},
        },
    ],
    ids=["loopback", "disabled", "auth"],
)
def test_a_closed_forward_proxy_says_nothing(tmp_path: Path, config: dict[str, Any]) -> None:
    assert check(tmp_path, config)[1] == []


def test_a_non_loopback_admin_without_a_token_warns_and_with_one_does_not(tmp_path: Path) -> None:
    admin = {"admin": {"host": "0.0.0.0", "port": 9901}}
    path = tmp_path / "gateway.yaml"
    assert check(tmp_path, admin)[1] == [f"warning: {path}:1: admin.token: {ADMIN}"]  # `admin:` is line 1
    assert check(tmp_path, admin, {"BT_GATEWAY_ADMIN_TOKEN": TOKEN})[1] == []


def test_the_token_is_never_printed_from_yaml_env_or_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")  # a Secret's file often ends in a newline
    for config, env in (
        ({"admin": {"host": "0.0.0.0", "port": 9901, "token": TOKEN}}, {}),
        ({"admin": {"host": "0.0.0.0", "port": 9901}}, {"BT_GATEWAY_ADMIN_TOKEN": TOKEN}),
        ({"admin": {"host": "0.0.0.0", "port": 9901, "token_file": str(secret)}}, {}),
    ):
        out, lines = check(tmp_path, config, env)
        assert yaml.safe_load(out)["admin"]["token"] == "***"
        assert lines == []  # the token was read: no warning
        assert TOKEN not in out + "".join(lines)


@pytest.mark.parametrize(
    ("admin", "message"),
    [
        ({"token": "short"}, SHAPE),
        ({"token": TOKEN + " x"}, SHAPE),
        ({"token": TOKEN, "token_file": "/x"}, "set admin.token or admin.token_file, not both"),
        ({"token_file": "/nonexistent/token"}, "cannot read /nonexistent/token: no such file or directory"),
    ],
)  # fmt: skip
def test_a_bad_token_is_refused_without_being_echoed(
    tmp_path: Path, admin: dict[str, str], message: str
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"admin": admin}))
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 2
    key = "admin.token_file" if "token_file" in admin else "admin.token"
    [line] = result.stderr.splitlines()
    assert line.endswith(f": {key}: {message}")
    assert "short" not in line and TOKEN not in line


async def test_serve_logs_the_same_warnings_once_and_never_the_token(tmp_path: Path) -> None:
    config = {**NO_TUNNELS, "listen": {"host": "0.0.0.0", "port": 0}, "admin": {"host": "0.0.0.0", "port": 0}}
    gw = GatewayProcess(config, tmp_path)
    try:
        await gw.event("admin_reload_disabled")
        await gw.event("forward_proxy_open")
    finally:
        assert gw.stop() == 0
    [proxy] = gw.events("forward_proxy_open")
    assert (proxy["key"], proxy["detail"]) == (
        "forward_proxy.auth",
        FORWARD_PROXY.replace("port 8080", "port 0"),
    )
    [admin] = gw.events("admin_reload_disabled")
    assert (admin["key"], admin["detail"]) == ("admin.token", ADMIN)
    quiet = GatewayProcess({**NO_TUNNELS, "admin": {"host": "0.0.0.0", "port": 0, "token": TOKEN}}, tmp_path)
    assert quiet.stop() == 0
    assert gw.events("gateway_stopped") and quiet.events("gateway_stopped")
    assert quiet.events("forward_proxy_open") == [] and quiet.events("admin_reload_disabled") == []
    assert [line for line in quiet.raw_lines if TOKEN in line] == []


def test_a_delay_that_outlasts_a_shutdown_is_one_warning_line(tmp_path: Path) -> None:
    app = {**APP, "rate_limit": {"max_requests": 10, "on_limit": "delay", "max_delay_s": 40}}
    no_proxy = {"enabled": False}
    _, lines = check(tmp_path, {"routes": [app], "shutdown_timeout_s": 20, "forward_proxy": no_proxy})
    path = tmp_path / "gateway.yaml"
    line = 1 + next(
        i for i, text in enumerate(path.read_text().splitlines()) if text.strip().startswith("max_delay_s")
    )
    assert lines == [
        f"warning: {path}:{line}: routes[0].rate_limit.max_delay_s: on_limit: delay holds a request up to "
        "40 s, longer than shutdown_timeout_s (20 s): at shutdown the requests still waiting get 503 "
        "shutting_down with Retry-After (routes: app); lower max_delay_s or raise shutdown_timeout_s"
    ]
    _, quiet = check(tmp_path, {"routes": [app], "shutdown_timeout_s": 40, "forward_proxy": no_proxy})
    assert quiet == []


REPORT = (
    "what the allow-list, deny_paths, rate limits, the method check, forward_proxy ports and the tunnel "
    "policy would refuse is let through and logged as would_refuse; set mode: enforce to refuse it"
)
REPORT_ROUTES = """\
allowlist: [www.braintrust.dev]
routes:
  - {name: app, prefix: /, upstream: 'https://www.braintrust.dev', rate_limit: off}
  - {name: trial, prefix: /trial, upstream: 'https://www.braintrust.dev', rate_limit: off, mode: report}
"""


def check_yaml(tmp_path: Path, text: str) -> list[str]:
    """check-config on a YAML file as written: its warning lines; it must succeed."""
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    result = run_cli("check-config", "-c", str(path), env={"PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    *lines, ok = result.stderr.splitlines()
    assert ok == f"config ok: {path}"
    return lines


def test_report_mode_is_one_warning_naming_its_routes(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    assert check_yaml(tmp_path, REPORT_ROUTES) == [
        f"warning: {path}:4: routes[1].mode: report mode is on for route trial: {REPORT}"
    ]
    top = check_yaml(tmp_path, "mode: report\n" + REPORT_ROUTES.replace(", mode: report", ", mode: enforce"))
    scope = "route app, tunnels and requests to no route"
    assert top == [f"warning: {path}:1: mode: report mode is on for {scope}: {REPORT}"]
    assert check_yaml(tmp_path, REPORT_ROUTES.replace(", mode: report", "")) == []
