"""Run the real `bt-gateway serve` console script as a subprocess; find its ports from its start-up log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml


class GatewayProcess:
    """A gateway subprocess; its stdout JSON log lines are collected in `lines` (and copied to `echo`)."""

    def __init__(
        self,
        config: dict[str, Any],
        tmp_path: Path,
        env: dict[str, str] | None = None,
        echo: TextIO | None = None,
        new_session: bool = False,
        args: Sequence[str] = (),
        prefix: Sequence[str] = (),
        wait: bool = True,
    ) -> None:
        """Write `config` to `tmp_path/gateway.yaml` (through it, if it is a symlink) and run `serve` on it.

        `args` are extra `serve` arguments, such as `--watch`. `prefix` runs it under commands that exec it
        (`ip netns exec NS setpriv --reuid UID`), so the pid is still the gateway's. `new_session`: a process
        group of its own, so a Ctrl-C meant for the caller does not reach it too (the caller stops it with
        one signal). `wait=False`: return at once; `started()` waits for the start-up log line later.
        """
        config = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            **config,
        }
        self.config_path = tmp_path / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.lines: list[dict[str, Any]] = []
        self.raw_lines: list[str] = []
        self._started = threading.Event()
        self._echo = echo
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [
                *prefix,
                str(Path(sys.executable).parent / "bt-gateway"),
                "serve",
                "-c",
                str(self.config_path),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            text=True,
            start_new_session=new_session,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            self.started()

    @property
    def is_started(self) -> bool:
        """Whether the start-up log line (or the end of the output) has been read."""
        return self._started.is_set()

    def started(self) -> None:
        """Wait for the gateway's start-up log line and learn its ports from it."""
        started = next(iter(self.events("gateway_started")), None) if self._started.wait(30) else None
        if started is None:
            self.stop()
            raise RuntimeError(f"gateway did not start: {''.join(self.raw_lines)}")
        self.port = int(started["listen"])
        self.admin_port = int(started["admin"])
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw_lines.append(line)
            if self._echo is not None:
                self._echo.write(line)
                self._echo.flush()
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.lines.append(event)
            if event.get("event") == "gateway_started":
                self._started.set()
        self._started.set()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def event(self, name: str, within_s: float = 15) -> dict[str, Any]:
        """The first `name` event, waiting for the process to log it (a hang guard, not a timing check)."""
        async with asyncio.timeout(within_s):
            while not (found := self.events(name)):
                await asyncio.sleep(0.01)
        return found[0]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def handles(self, sig: int) -> bool:
        """Whether the process has a handler for `sig` installed (its SigCgt mask in /proc)."""
        return bool(self._mask("SigCgt:") & 1 << (sig - 1))

    def signal_delivered(self, sig: int, within_s: float = 15) -> None:
        """Send `sig` and return once the kernel delivered it (no longer pending), so that the next one
        is a delivery of its own rather than merged into this one (a hang guard, not a timing check)."""
        self.proc.send_signal(sig)
        bit = 1 << (sig - 1)
        deadline = time.monotonic() + within_s
        while self._mask("SigPnd:", "ShdPnd:") & bit:
            if time.monotonic() > deadline:
                raise TimeoutError(f"signal {sig} still pending after {within_s} s")

    def _mask(self, *fields: str) -> int:
        """Signal masks from /proc/<pid>/status, or-ed (SigPnd and ShdPnd: pending; SigCgt: handled)."""
        mask = 0
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(fields):
                mask |= int(line.split()[1], 16)
        return mask

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def signal_until_exit(self, sig: int) -> int:
        """Send `sig` without pause until the process is gone (a terminal's Ctrl-C reaches a whole process
        group; an orchestrator may repeat itself); its exit code."""

        process = os.pidfd_open(self.proc.pid)  # this process, even once its pid is reaped and reused

        def barrage() -> None:
            with contextlib.suppress(ProcessLookupError):  # it is gone
                while self.proc.returncode is None:
                    signal.pidfd_send_signal(process, sig)

        sender = threading.Thread(target=barrage)
        sender.start()
        try:
            return self.wait()
        finally:
            sender.join(30)
            os.close(process)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.terminate()
        try:
            return self.wait()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait()

    def peak_rss_kb(self) -> int:
        """VmHWM: the most resident memory the process ever held."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")
