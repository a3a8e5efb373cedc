"""A real redis-server on a free loopback port, started and stopped by the test that needs it.

Missing binary: the test is skipped on a developer machine, but fails under CI=true, where a skipped
Redis test would hide a broken shared-limit feature.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests.clients import free_port
from tests.tools import require_binaries


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.binary = require_binaries("redis-server")["redis-server"]
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
