"""The real CLI: `check-config` errors and exit codes, `serve` as a subprocess, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.clients import run_cli
from tests.conftest import Upstream
from tests.gateway_process import GatewayProcess

GOOD = """\
allowlist: [www.braintrust.dev, braintrust.dev]
routes:
  - {name: app, prefix: /, upstream: https://www.braintrust.dev}
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (GOOD + "listn: {port: 1}\n", "F:4: listn: unknown key; did you mean 'listen'?"),
        (
            "routes:\n  - {name: app, prefix: /, upstream: 'ftp://www.braintrust.dev'}\n",
            "F:2: routes[0].upstream: must be an http:// or https:// URL, got 'ftp://www.braintrust.dev'",
        ),
        (
            "routes:\n  - {name: app, prefix: /, upstream: https://www.braintrust.dev}\n"
            "  - {name: data, prefix: /d, upstream: https://api.evil.com}\n",
            "F:3: routes[1].upstream: host 'api.evil.com' is not on the allowlist",
        ),
        ("listen:\n  port: eighty\n", "F:2: listen.port: must be a whole number"),
        (
            "allowlist: ['*braintrust.dev']\n",
            "F:1: allowlist[0]: '*braintrust.dev': a wildcard must be a whole leading label, "
            "as in *.example.com",
        ),
        ("listen: [1, 2\n", "F:2: config: invalid YAML: expected ',' or ']', but got '<stream end>'"),
        (
            "rate_limit: {max_requests: 5}\nlisten: {port: 1}\nrate_limit: off\n",
            "F:3: rate_limit: key appears twice, at lines 1 and 3",
        ),
        (
            GOOD.replace("upstream: https://www.braintrust.dev}", "upstream: https://www.braintrust.dev,")
            + "      rate_limit: no}\n",
            "F:4: routes[0].rate_limit: must be off or a mapping such as "
            "{max_requests: 100, window_minutes: 1}",
        ),
        (
            GOOD + "  - {name: forward_proxy, prefix: /fp, upstream: https://www.braintrust.dev}\n",
            "F:4: routes[1].name: 'forward_proxy' is reserved for the gateway's own use; choose another name",
        ),
        (
            GOOD + "rewrite:\n  max_buffer_kb: 1\n  rules:\n"
            f"    - {{from: 'https://www.braintrust.dev/{'a' * 1100}', to: https://example.com}}\n",
            "F:4: rewrite: the rule from 'https://www.braintrust.dev/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...' "
            "is 1130 bytes long in its JSON-escaped form, over max_buffer_kb (1024 bytes)",
        ),
        (
            GOOD + "listen: {port: 8080}\nworkers: 2\n",
            "F:5: workers: more than 1 needs a shared rate_limit.storage (redis://...): with memory:// "
            "each worker would count on its own and allow that many times the limit",
        ),
        (
            GOOD + "workers: 2\nlisten: {port: 0}\nrate_limit: {storage: 'redis://127.0.0.1:1/0'}\n",
            "F:4: workers: more than 1 needs a fixed listen.port (0 picks one per worker)",
        ),
        (
            GOOD
            + "listen:\n  tls:\n    cert_file: /nonexistent/tls.crt\n    key_file: /nonexistent/tls.key\n",
            "F:6: listen.tls.cert_file: cannot read '/nonexistent/tls.crt': No such file or directory",
        ),
        (
            GOOD + "upstream: {ca_bundle: /nonexistent/ca.pem}\n",
            "F:4: upstream.ca_bundle: cannot read '/nonexistent/ca.pem': No such file or directory",
        ),
    ],
)
def test_check_config_reports_one_line_per_problem_and_exits_2(
    tmp_path: Path, yaml_text: str, expected: str
) -> None:
    path = write(tmp_path, yaml_text)
    result = run_cli("check-config", "-c", path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [expected.replace("F:", f"{path}:", 1)]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_serve_refuses_exactly_what_check_config_refuses(tmp_path: Path) -> None:
    """A config that validates but cannot be built fails check-config and serve with the same line."""
    long_rule = f"https://www.braintrust.dev/{'a' * 1100}"
    path = write(
        tmp_path,
        GOOD + f"rewrite: {{max_buffer_kb: 1, rules: [{{from: '{long_rule}', to: https://example.com}}]}}\n",
    )
    checked = run_cli("check-config", "-c", path)
    served = run_cli("serve", "-c", path, "--listen-port", "0", "--admin-port", "0")
    assert checked.returncode == served.returncode == 2
    [line] = checked.stderr.splitlines()
    assert line.startswith(f"{path}:4: rewrite: the rule from 'https://www.braintrust.dev/aaa")
    assert served.stderr.splitlines() == [line]
    assert "Traceback" not in served.stdout + served.stderr


def test_yaml_off_and_false_turn_a_limit_off(tmp_path: Path) -> None:
    """`off` is what the README and the shipped file show; PyYAML alone would read it as false."""
    text = (
        "allowlist: [www.braintrust.dev, braintrust.dev, api.braintrust.dev]\n"
        "routes:\n"
        "  - {name: app, prefix: /, upstream: https://www.braintrust.dev, rate_limit: off}\n"
        "  - {name: data, prefix: /data-plane, upstream: https://api.braintrust.dev, rate_limit: false}\n"
        "forward_proxy: {enabled: off}\n"
    )
    path = write(tmp_path, text)
    result = run_cli("check-config", "-c", path)
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert [r["rate_limit"]["max_requests"] for r in effective["routes"]] == [0, 0]
    assert effective["forward_proxy"]["enabled"] is False
    assert result.stderr == f"config ok: {path}\n"


def test_check_config_says_when_it_used_built_in_defaults(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    result = run_cli("check-config", env=env, cwd=tmp_path)  # no config/gateway.yaml here
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        "config ok: built-in defaults (no -c FILE or $BT_GATEWAY_CONFIG"
    )


def test_check_config_env_errors_name_the_variable(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "BRAINTRUST_APP_URL": "https://evil.example",
        "BT_GATEWAY_LISTEN_PORT": "x",
    }
    result = run_cli("check-config", "-c", write(tmp_path, GOOD), env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "env BT_GATEWAY_LISTEN_PORT: listen.port: must be a whole number",
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


def test_check_config_never_prints_the_relay_secret(tmp_path: Path) -> None:
    secret = "relay-secret-never-printed-0123456789"
    text = GOOD + f"relay: {{allow_hosts: [store.example], secret: {secret}}}\n"
    for env in ({}, {"BT_GATEWAY_RELAY_SECRET": secret + "-from-env"}):
        result = run_cli("check-config", "-c", write(tmp_path, text), env={"PATH": "/usr/bin:/bin", **env})
        assert result.returncode == 0, result.stderr
        assert secret not in result.stdout
        assert "  secret: '***'" in result.stdout.splitlines()


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("bt-gateway ")


def test_missing_config_file_is_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    result = run_cli("serve", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr == f"{path}: config: cannot read the file: No such file or directory\n"


def test_serve_watch_without_a_config_file_is_exit_2(tmp_path: Path) -> None:
    result = run_cli("serve", "--watch", env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)  # no file anywhere
    assert result.returncode == 2
    assert result.stderr == "--watch: there is no config file to watch (built-in defaults are in use)\n"


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


def test_serve_refuses_an_aiohttp_without_the_internals_it_uses(tmp_path: Path) -> None:
    """An aiohttp that renamed a private name the gateway uses stops the start with one line, exit 1."""
    without = (
        "import sys; from aiohttp import web; del web.StreamResponse._prepare_headers; "
        "from gateway.cli import main; sys.exit(main())"
    )
    path = write(tmp_path, GOOD)
    result = subprocess.run(
        [sys.executable, "-c", without, "serve", "-c", path, "--listen-port", "0", "--admin-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert (
        f"aiohttp {aiohttp.__version__} lacks what bt-gateway uses (StreamResponse._prepare_headers)"
        in output
    )
    assert "Traceback" not in output


NEEDED_FILES = 2 * 4096 + 1024 + 256  # the default bounds: clients, an upstream each, the pool, spare


@pytest.mark.parametrize("enough", [True, False])
def test_serve_raises_its_open_file_limit_to_what_its_connection_bounds_need(
    tmp_path: Path, enough: bool
) -> None:
    """Started under systemd's 1,024 soft limit, the gateway raises it (up to the hard limit) so accept()
    cannot fail with EMFILE before `max_client_connections` answers 503; a hard limit too low is said."""
    ours = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # a hard limit can be lowered, not raised
    assert ours >= NEEDED_FILES, f"this test needs a hard open-file limit of {NEEDED_FILES}, not {ours}"
    hard, soft, warned = (min(ours, 2 * NEEDED_FILES), NEEDED_FILES, False) if enough else (4096, 4096, True)
    prlimit = ["prlimit", f"--nofile=1024:{hard}", "--"]  # execs the gateway: the pid stays its own
    gw = GatewayProcess({}, tmp_path, prefix=prlimit)
    try:
        limits = Path(f"/proc/{gw.proc.pid}/limits").read_text().splitlines()
        [line] = [line for line in limits if line.startswith("Max open files")]
        assert line.split()[3:5] == [str(soft), str(hard)]
        said = gw.events("open_files_limit")
        assert [(e["limit"], e["needed"]) for e in said] == ([(hard, NEEDED_FILES)] if warned else [])
    finally:
        assert gw.stop() == 0
