"""`make try` (tests/try_offline.py): the README's offline demo, run as the README shows it, with real SDKs.

The command is the `try` recipe as `make -n` expands it, run without make in between: GNU make re-raises a
SIGINT it got once its recipe ends, whatever the recipe's exit code, so only the recipe itself can show
that Ctrl-C ends the demo with exit code 0. Ctrl-C is a SIGINT to the launcher's whole process group,
as a terminal sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.integration.test_js_sdk import JS_DIR, require_node, run_flow
from tests.sdk_flow import ROOT, run_in_subprocess

COMMAND = "make try"
EXPORTS = ("BRAINTRUST_APP_URL", "BRAINTRUST_API_KEY")
EXPORT = re.compile(r"export ([A-Z_]+)=(\S+)")
LIMIT_S = 60.0  # a hang guard on each wait (start, read, stop), not a timing check


def recipe(port: int) -> list[str]:
    """What the README's command runs, with `TRY_PORT=<port>` (the last line: a stale install comes first)."""
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert f"\n{COMMAND} " in quick_start, f"the README's quick start no longer shows `{COMMAND}`"
    expanded = subprocess.run(
        ["make", "-s", "-n", "try", f"TRY_PORT={port}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=LIMIT_S,
    )
    return shlex.split(expanded.stdout.strip().splitlines()[-1])


@dataclass
class Demo:
    proc: asyncio.subprocess.Process
    env: dict[str, str]  # what the export lines say
    gateway: int  # a pidfd: the gateway process itself, whatever later takes its pid
    log: Path  # the launcher's stderr: the gateway's log

    @property
    def url(self) -> str:
        return self.env["BRAINTRUST_APP_URL"]

    async def line_starting(self, prefix: str) -> str:
        """The next stdout line that starts with `prefix` (the hints come right after the exports)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(LIMIT_S):
            while line := (await self.proc.stdout.readline()).decode():
                if line.startswith(prefix):
                    return line.rstrip("\n")
        raise AssertionError(f"no line starting {prefix!r}")

    async def try_hint(self, command: str, cwd: Path) -> None:
        """The hint line that runs `command`, run as printed in a shell with the exports (`python3` is
        this environment's): it logs an experiment and prints its link on the gateway."""
        hint = await self.line_starting(f"{command} ")
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        tried = subprocess.run(
            hint,
            shell=True,
            cwd=cwd,
            env={**os.environ, **self.env, "PATH": path},
            capture_output=True,
            timeout=LIMIT_S,
        )
        assert tried.returncode == 0, tried.stderr.decode()[-4000:]
        assert f"{self.url}/app/acme/p/offline/experiments/" in tried.stdout.decode()

    async def stop(self, sig: signal.Signals, *, group: bool) -> str:
        """Send `sig` (to the whole process group: Ctrl-C); it must exit 0 leaving nothing. Its last words."""
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        out, _ = await asyncio.wait_for(self.proc.communicate(), LIMIT_S)
        assert self.proc.returncode == 0, self.log.read_text()[-4000:]
        self.assert_nothing_left()
        return out.decode()

    def assert_nothing_left(self) -> None:
        """No gateway and nothing else of the demo's still runs (the launcher reaped what it started)."""
        with pytest.raises(ProcessLookupError):
            signal.pidfd_send_signal(self.gateway, 0)
        with pytest.raises(ProcessLookupError):
            os.killpg(self.proc.pid, 0)


def children(pid: int) -> set[int]:
    """The processes `pid` started, from any of its threads."""
    return {
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    }


@contextlib.asynccontextmanager
async def demo(tmp_path: Path, env: dict[str, str] | None = None) -> AsyncIterator[Demo]:
    """The README's command on a free port (`env` added to this one's); its `export` lines read as
    they come, first on stdout."""
    log = tmp_path / "try.log"
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *recipe(0),
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
    gateway = None
    try:
        assert proc.stdout is not None
        exports = {}
        async with asyncio.timeout(LIMIT_S):
            for name in EXPORTS:
                line = (await proc.stdout.readline()).decode()
                match = EXPORT.fullmatch(line.rstrip("\n"))
                assert match is not None and match[1] == name, (line, log.read_text())
                exports[name] = match[2]
        (gateway_pid,) = children(proc.pid)
        gateway = os.pidfd_open(gateway_pid)
        yield Demo(proc, exports, gateway, log)
    finally:
        if proc.returncode is None:  # a failed test: stop it the usual way, else for good
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), LIMIT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if gateway is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(gateway, signal.SIGKILL)
            os.close(gateway)


@pytest.mark.sdk
async def test_python_sdk_through_make_try_then_ctrl_c(sdk_env: None, tmp_path: Path) -> None:
    # Exports left in the shell by an earlier `make try` on another port do not move the gateway.
    async with demo(tmp_path, {"BRAINTRUST_APP_URL": "http://127.0.0.1:9"}) as offline:
        url = offline.url
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url) and not url.endswith(":0")
        result = await run_in_subprocess(url, offline.env["BRAINTRUST_API_KEY"], offline.env)

        # The login sent the SDK's data plane back through the gateway; its rows went there and back.
        assert (result.api_url, result.proxy_url) == (f"{url}/data-plane", f"{url}/data-plane")
        assert result.rows == [("a", "b"), ("c", "d")]
        assert result.scores == {"accuracy": 1.0}
        assert result.summary_url == f"{url}/app/acme/p/proj/experiments/exp1"
        # A link the SDK prints opens the stand-in's webapp page: nothing points at braintrust.dev.
        async with aiohttp.ClientSession() as browser:
            async with browser.get(result.permalink, headers={"Accept": "text/html"}) as page:
                assert page.status == 200 and page.content_type == "text/html"
                assert page.history[0].status == 302

        await offline.try_hint("python3", ROOT)
        assert "The stand-in received" in await offline.stop(signal.SIGINT, group=True)


@pytest.mark.sdk
async def test_typescript_sdk_through_make_try(tmp_path: Path) -> None:
    node = require_node()
    async with demo(tmp_path) as offline:
        url = offline.url
        out = await run_flow(node, offline.env)
        assert out["login"] == {
            "apiUrl": f"{url}/data-plane",
            "proxyUrl": f"{url}/data-plane",
            "orgName": "acme",
        }
        assert out["dataset"]["rows"] == [["a", "b"], ["c", "d"]]
        assert out["eval"]["errors"] == 0

        await offline.try_hint("node", JS_DIR)
        await offline.stop(signal.SIGINT, group=True)


async def test_make_try_stops_on_sigterm(tmp_path: Path) -> None:
    async with demo(tmp_path) as offline:
        await offline.stop(signal.SIGTERM, group=False)


def test_make_try_reports_a_port_in_use() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        command = recipe(port)
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)
    assert done.returncode == 1
    assert done.stdout == ""
    assert '"event": "startup_failed"' in done.stderr
    assert "# bt-gateway did not start (its log is above)" in done.stderr


def test_make_try_needs_only_the_runtime_install() -> None:
    """`make try` has `make run`'s install: nothing from the test or dev extras may be imported."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[\[<>=!~;\s]", req, maxsplit=1)[0] for reqs in extras.values() for req in reqs}
    blocked = sorted(name.replace("-", "_").lower() for name in names)
    code = (
        "import sys\n"
        "class TestExtras:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.partition('.')[0] in {blocked!r}:\n"
        "            raise ImportError(name + ' comes with the test extras')\n"
        "sys.meta_path.insert(0, TestExtras())\n"
        "import tests.try_offline\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S
    )
    assert done.returncode == 0, done.stderr
    assert {"pytest", "trustme", "braintrust"} <= set(blocked)
