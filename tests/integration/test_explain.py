"""`bt-gateway explain` as people run it: the real CLI on real YAML files, a real Redis shared with a real
gateway for counts, and the real admin listener for POST /explain.

Names resolve through static `resolve:` entries (the gateway's own resolver), so no test needs DNS.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import coredis
import pytest
import yaml

from tests.clients import run_cli
from tests.conftest import Upstream
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer

TOKEN = "sk-explain-0123456789"
FINGERPRINT = "563c5e9c7c99"  # sha256(TOKEN)[:12], as the access log prints it
ADMIN_TOKEN = "admin-token-0123456789abcdef"
CONFIG = """\
allowlist: [www.braintrust.dev, api.braintrust.dev, "files.example.com:443", "files.example.com:8443"]
forward_proxy:
  enabled: true
  connect_ports: [443]
  deny_private_addresses: true
deny_paths: ["/v1/secret/**"]
resolve:
  api.braintrust.dev: 203.0.113.7
  files.example.com: 10.1.2.3
routes:
  - {name: app, prefix: /, upstream: https://www.braintrust.dev}
  - {name: api, prefix: /api, upstream: https://api.braintrust.dev, advertise: true}
"""
REPORT_KEYS = {
    "explain",
    "request",
    "outcome",
    "status",
    "code",
    "reason",
    "detail",
    "decided_by",
    "would_refuse",
    "steps",
    "route",
    "upstream",
    "resolve",
    "rate_limit",
    "rewrite",
}
HTTP_STEPS = [
    "limits",
    "method",
    "host",
    "credentials",
    "redirect",
    "route",
    "allowlist",
    "forward_proxy",
    "deny_paths",
    "ratelimit",
]


def config_file(tmp_path: Path, text: str = CONFIG) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return str(path)


def explain(config: str, *args: str) -> tuple[int, Any, str]:
    """(exit code, the --json report, stderr) of `bt-gateway explain -c CONFIG --json ARGS`."""
    done = run_cli("explain", "-c", config, "--json", *args)
    return done.returncode, json.loads(done.stdout) if done.stdout else None, done.stderr


def verdicts(report: Any) -> list[tuple[str, str]]:
    return [(step["step"], step["verdict"]) for step in report["steps"]]


def test_an_allowed_request_names_its_route_upstream_addresses_and_rewrite(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    code, report, _ = explain(config, "--token", TOKEN, "-X", "POST", "/api/api/apikey/login")
    assert code == 0
    assert (report["outcome"], report["status"], report["decided_by"]) == ("forward", None, None)
    assert report["route"] == "api"
    assert report["upstream"] == {
        "url": "https://api.braintrust.dev/api/apikey/login",
        "host": "api.braintrust.dev",
        "port": 443,
        "via_proxy": None,
    }
    assert report["resolve"] == {
        "host": "api.braintrust.dev",
        "by": "gateway",
        "checks": ["allowlist"],
        "addresses": [{"address": "203.0.113.7", "allowed": True, "reason": None}],
        "error": None,
    }
    assert report["request"]["token_fingerprint"] == FINGERPRINT
    rewrite = report["rewrite"]
    assert (rewrite["body"], rewrite["body_path"]) == (True, "/api/apikey/login")
    assert rewrite["external_url"] == "http://localhost:8080"
    assert {"from": "https://api.braintrust.dev", "to": "http://localhost:8080/api"} in rewrite["rules"]
    # a path off rewrite.body_paths: headers only
    code, report, _ = explain(config, "--token", TOKEN, "/api/v1/project")
    assert (code, report["rewrite"]["body"], report["rewrite"]["body_path"]) == (0, False, None)
    assert verdicts(report) == list(
        zip(HTTP_STEPS, ["pass"] * 5 + ["api", "allow", "pass", "allow", "allow"], strict=True)
    )


def test_the_text_report_shows_each_step_and_never_the_token(tmp_path: Path) -> None:
    done = run_cli("explain", "-c", config_file(tmp_path), "--token", TOKEN, "/api/v1/secret/x")
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"GET /api/v1/secret/x  (token {FINGERPRINT}, from 127.0.0.1)"
    assert "  deny_paths     deny  403 path_denied (path_denied): " in "\n".join(lines)
    assert "  ratelimit      not_reached" in lines
    assert "upstream:   https://api.braintrust.dev/v1/secret/x" in lines
    assert lines[-1].startswith("verdict:    refuse 403 path_denied (path_denied): ")
    assert TOKEN not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("target", "code", "status", "step", "route"),
    [
        ("http://evil.example/x", "egress_denied", 403, "allowlist", "forward_proxy"),
        ("/api/v1/secret/keys", "path_denied", 403, "deny_paths", "api"),
    ],
    ids=["egress-denied-absolute-url", "deny-paths"],
)
def test_each_refusal_names_the_step_and_its_reason(
    tmp_path: Path, target: str, code: str, status: int, step: str, route: str
) -> None:
    exit_code, report, _ = explain(config_file(tmp_path), "--no-token", target)
    assert exit_code == 1
    assert (report["outcome"], report["code"], report["status"], report["decided_by"]) == (
        "refuse",
        code,
        status,
        step,
    )
    assert report["route"] == route
    refused = [s for s in report["steps"] if s["code"] is not None]
    assert [(s["step"], s["code"]) for s in refused] == [(step, code)]
    after = report["steps"][HTTP_STEPS.index(step) + 1 :]
    assert [s["verdict"] for s in after] == ["not_reached"] * len(after)
    assert (report["rate_limit"], report["rewrite"]) == (None, None)


def test_a_path_no_route_serves_is_refused_with_404(tmp_path: Path) -> None:
    text = CONFIG.replace("  - {name: app, prefix: /, upstream: https://www.braintrust.dev}\n", "")
    code, report, _ = explain(config_file(tmp_path, text), "--no-token", "/v1/project")
    assert code == 1
    assert (report["code"], report["status"], report["reason"], report["decided_by"]) == (
        "no_route",
        404,
        "no_route",
        "route",
    )
    assert (report["route"], report["upstream"], report["resolve"]) == (None, None, None)


def test_connect_to_an_allowed_port_and_a_refused_one(tmp_path: Path) -> None:
    config = config_file(
        tmp_path, CONFIG.replace("deny_private_addresses: true", "deny_private_addresses: false")
    )
    code, report, _ = explain(config, "CONNECT", "files.example.com:443")
    assert code == 0
    assert verdicts(report) == [
        ("limits", "pass"),
        ("credentials", "pass"),
        ("connect", "target"),
        ("forward_proxy", "allow"),
        ("tunnel_limit", "allow"),
    ]
    assert (report["route"], report["upstream"]["host"], report["upstream"]["port"]) == (
        "tunnel",
        "files.example.com",
        443,
    )
    assert report["rate_limit"]["key_kind"] == "client_ip" and report["rate_limit"]["count"] is None
    code, report, _ = explain(config, "-X", "CONNECT", "files.example.com:8443")
    assert code == 1
    assert (report["code"], report["reason"], report["decided_by"]) == (
        "egress_denied",
        "port_not_allowed",
        "forward_proxy",
    )
    assert report["detail"] == "CONNECT to port 8443 is not allowed"


def test_a_tunnel_whose_name_resolves_only_to_private_addresses_is_refused_at_dial(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    code, report, _ = explain(config, "CONNECT files.example.com:443")
    assert code == 1
    assert (report["code"], report["reason"], report["decided_by"]) == (
        "egress_denied",
        "private_address",
        "dial",
    )
    assert report["resolve"]["checks"] == ["allowlist", "private_address"]
    assert report["resolve"]["addresses"] == [
        {"address": "10.1.2.3", "allowed": False, "reason": "private_address"}
    ]
    # --no-resolve: the chain alone, which lets it through; nothing was resolved
    code, report, _ = explain(config, "--no-resolve", "CONNECT files.example.com:443")
    assert (code, report["outcome"], report["resolve"]) == (0, "forward", None)
    done = run_cli("explain", "-c", config, "--no-resolve", "CONNECT", "files.example.com:443")
    assert "resolves:   not resolved (--no-resolve, or no destination)" in done.stdout.splitlines()


def test_the_json_shape_is_stable(tmp_path: Path) -> None:
    code, report, _ = explain(config_file(tmp_path), "--token", TOKEN, "/api/v1/project")
    assert code == 0
    assert set(report) == REPORT_KEYS and report["explain"] == 1
    assert report["request"] == {
        "method": "GET",
        "url": "/api/v1/project",
        "token_fingerprint": FINGERPRINT,
        "client_ip": "127.0.0.1",
    }
    for step in report["steps"]:
        assert set(step) == {"step", "verdict", "status", "code", "reason", "detail"}
    assert report["rate_limit"] == {
        "step": "ratelimit",
        "verdict": "allow",
        "key_kind": "token",
        "key_id": FINGERPRINT,
        "count": None,
        "max_requests": 100,
        "window_s": 60,
        "on_limit": "reject",
        "storage": "memory",
        "shared": False,
        "wait_s": 0.0,
        "note": "in-memory storage: the count is per process and not visible from here",
    }
    assert set(report["rewrite"]) == {
        "enabled",
        "body",
        "body_path",
        "headers",
        "external_url",
        "rules",
        "note",
    }


def test_the_token_defaults_to_the_sdk_environment_and_no_token_drops_it(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    env = {**os.environ, "BRAINTRUST_API_KEY": TOKEN}
    done = run_cli("explain", "-c", config, "--json", "/api/v1/project", env=env)
    assert json.loads(done.stdout)["request"]["token_fingerprint"] == FINGERPRINT
    done = run_cli("explain", "-c", config, "--json", "--no-token", "/api/v1/project", env=env)
    assert json.loads(done.stdout)["rate_limit"]["key_kind"] == "client_ip"


def test_a_config_error_exits_2_with_one_line(tmp_path: Path) -> None:
    config = config_file(tmp_path, CONFIG + "listn: {port: 1}\n")
    done = run_cli("explain", "-c", config, "/v1/project")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"{config}:13: listn: unknown key; did you mean 'listen'?\n"
    done = run_cli("explain", "-c", config_file(tmp_path), "-H", "X-Broken", "/v1/project")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "bt-gateway explain: header 'X-Broken' is not 'Name: value'\n"


CASES = """\
- name: the SDK's login
  url: /api/api/apikey/login
  method: POST
  token: sk-one
  expect: forward
  route: api
- url: http://evil.example/x
  expect: refuse
  code: egress_denied
  status: 403
- url: CONNECT files.example.com:22
  expect: refuse
  status: 403
- url: /api/v1/secret/keys
  headers: ["X-Extra: 1"]
  expect: refuse
  code: path_denied
"""


def test_cases_all_matching_exit_0(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(CASES)
    done = run_cli("explain", "-c", config_file(tmp_path), "--cases", str(cases))
    assert (done.returncode, done.stdout, done.stderr) == (0, "4 cases, no mismatches\n", "")


def test_a_mismatching_case_exits_1_naming_its_line(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(CASES.replace("code: path_denied", "code: rate_limited"))
    done = run_cli("explain", "-c", config_file(tmp_path), "--cases", str(cases))
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [
        f"{cases}:14: GET /api/v1/secret/keys: expected refuse rate_limited, got refuse 403 path_denied "
        "on route api",
        "4 cases, 1 mismatches",
    ]


def test_a_malformed_case_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(CASES + "- url: /x\n  expect: maybe\n")
    done = run_cli("explain", "-c", config_file(tmp_path), "--cases", str(cases))
    assert (done.returncode, done.stdout) == (2, "")
    assert (
        done.stderr == f"{cases}:18: cases[4].expect: must be one of forward, refuse, redirect, got 'maybe'\n"
    )


async def window_size(redis_url: str) -> int:
    """Requests counted in Redis now, read straight from the store (the moving window's sorted sets)."""
    client = coredis.Redis.from_url(redis_url)
    keys = [key async for key in client.scan_iter(match="btgw:mw:*")]
    return sum([await client.zcard(key) for key in keys])


@pytest.mark.redis
async def test_a_shared_count_is_read_never_counted_until_the_limit_refuses(
    tmp_path: Path, upstream: Upstream
) -> None:
    redis = RedisServer(tmp_path)
    host = upstream.url.split("://")[1]
    text = (
        f"allowlist: ['{host}']\n"
        f"routes:\n  - {{name: app, prefix: /, upstream: '{upstream.url}'}}\n"
        f"rate_limit: {{max_requests: 2, window_minutes: 10, storage: '{redis.url}'}}\n"
    )
    config = config_file(tmp_path, text)
    (tmp_path / "gw").mkdir()
    gw = GatewayProcess(yaml.safe_load(text), tmp_path / "gw")  # the same config, serving
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(gw.url + "/v1/a", headers=auth) as resp:
                assert resp.status == 200
            assert await window_size(redis.url) == 1
            code, report, _ = explain(config, "--token", TOKEN, "--no-resolve", "/v1/a")
            assert (code, report["rate_limit"]["count"], report["rate_limit"]["verdict"]) == (0, 1, "allow")
            assert report["rate_limit"]["note"] == "read from the shared store; explaining counted nothing"
            assert await window_size(redis.url) == 1  # explain did not count
            async with client.get(gw.url + "/v1/b", headers=auth) as resp:
                assert resp.status == 200  # the second of two: the explain above took no slot
            code, report, _ = explain(config, "--token", TOKEN, "--no-resolve", "/v1/c")
            assert (code, report["code"], report["status"], report["decided_by"]) == (
                1,
                "rate_limited",
                429,
                "ratelimit",
            )
            assert (report["rate_limit"]["count"], report["rate_limit"]["key_id"]) == (2, FINGERPRINT)
            assert report["rate_limit"]["storage"] == "redis"
            assert await window_size(redis.url) == 2
            async with client.get(gw.url + "/v1/d", headers=auth) as resp:
                assert resp.status == 429  # the gateway agrees
    finally:
        gw.stop()
        redis.stop()
    access = [e for e in gw.events("access") if e["path"] == "/v1/d"]
    assert access[0]["token_fp"] == FINGERPRINT


async def post_explain(url: str, body: Any, token: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as client, client.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_post_explain_answers_as_the_cli_does_only_with_the_admin_token(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    (tmp_path / "gw").mkdir()
    gw = GatewayProcess(
        {**yaml.safe_load(CONFIG), "admin": {"host": "0.0.0.0", "port": 0, "token": ADMIN_TOKEN}},
        tmp_path / "gw",
    )
    body = {"url": "/api/v1/secret/x", "token": TOKEN, "method": "POST", "headers": ["X-Extra: 1"]}
    try:
        url = f"http://127.0.0.1:{gw.admin_port}/explain"
        status, answer = await post_explain(url, body, None)
        assert (status, answer["error"]["code"]) == (401, "admin_token_invalid")
        status, answer = await post_explain(url, body, ADMIN_TOKEN + "x")
        assert (status, answer["error"]["code"]) == (401, "admin_token_invalid")
        status, answer = await post_explain(url, body, ADMIN_TOKEN)
        assert status == 200
        status, bad = await post_explain(url, {"url": "/x", "tokn": TOKEN}, ADMIN_TOKEN)
        assert (status, bad["error"]["code"]) == (400, "bad_request")
    finally:
        assert gw.stop() == 0
    code, report, _ = explain(config, "--token", TOKEN, "-X", "POST", "-H", "X-Extra: 1", "/api/v1/secret/x")
    assert (code, answer) == (1, report)
    assert [(e["outcome"], e["code"], e["token_fp"]) for e in gw.events("explain")] == [
        ("refuse", "path_denied", FINGERPRINT)
    ]
    assert [line for line in gw.raw_lines if TOKEN in line or ADMIN_TOKEN in line] == []


async def test_without_an_admin_token_post_explain_is_served_on_loopback_only(tmp_path: Path) -> None:
    """The rules of POST /reload: a non-loopback listener needs admin.token; a loopback one does not."""
    for name, host in (("open", "0.0.0.0"), ("loopback", "127.0.0.1")):
        (tmp_path / name).mkdir()
        gw = GatewayProcess({"admin": {"host": host, "port": 0}}, tmp_path / name)
        try:
            url = f"http://127.0.0.1:{gw.admin_port}/explain"
            status, answer = await post_explain(url, {"url": "/v1/project", "no_resolve": True}, None)
        finally:
            assert gw.stop() == 0
        if host == "0.0.0.0":
            assert (status, answer["error"]["code"]) == (403, "admin_token_not_set")
            assert gw.events("explain") == []
        else:
            assert (status, answer["outcome"], answer["route"]) == (200, "forward", "app")


def test_in_report_mode_a_refusal_let_through_is_forward_with_what_enforce_would_send(tmp_path: Path) -> None:
    """explain answers what serve does: report mode forwards, and says which refusal it let go."""
    code, report, _ = explain(
        config_file(tmp_path, "mode: report\n" + CONFIG), "--no-token", "/v1/secret/keys"
    )
    assert (code, report["outcome"], report["decided_by"]) == (0, "forward", None)
    assert ("deny_paths", "would_refuse") in verdicts(report)
    assert report["would_refuse"] == {
        "step": "deny_paths",
        "status": 403,
        "code": "path_denied",
        "reason": "path_denied",
        "detail": report["would_refuse"]["detail"],
    }
    enforced, report, _ = explain(config_file(tmp_path), "--no-token", "/v1/secret/keys")
    assert (enforced, report["outcome"], report["would_refuse"]) == (1, "refuse", None)
