"""A pod and the outside as two network namespaces of the test's own, joined by a veth pair.

Addresses are documentation ranges only (198.51.100.0/24, 2001:db8:100::/64), so nothing here can reach
or shadow a real network. Everything made (namespaces, the veth pair, processes) is removed on exit, also
when the test fails. Processes run with `ip netns exec NS [setpriv --reuid UID ...] ARGV`, which exec in
turn: the pid the test holds is the process itself. Peers are tests/netns_peer.py.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POD_V4, OUT_V4 = "198.51.100.1", "198.51.100.2"
POD_V6, OUT_V6 = "2001:db8:100::1", "2001:db8:100::2"
PEER = str(Path(__file__).resolve().parent / "netns_peer.py")
DEADLINE_S = 15  # a hang guard for every wait here, never a timing check


def wait_until(condition: Callable[[], bool], what: str, within_s: float = DEADLINE_S) -> None:
    """Poll `condition` until it holds; fail naming `what` at the deadline."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        time.sleep(0.01)


@dataclass
class Namespaces:
    """The two namespaces' names; `exec` builds the argv that runs a command in one, as a given UID."""

    pod: str
    out: str
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def exec(self, ns: str, argv: Sequence[str], uid: int | None = None) -> list[str]:
        user = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return ["ip", "netns", "exec", ns, *user, *argv]

    def run(self, ns: str, argv: Sequence[str], uid: int | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.exec(ns, argv, uid), capture_output=True, text=True, timeout=60)

    def peer(self, ns: str, *args: str, uid: int | None = None) -> dict[str, Any]:
        """Run one tests/netns_peer.py client command; its one JSON line."""
        done = self.run(ns, [sys.executable, PEER, *args], uid)
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def listen(self, ns: str, listeners: dict[str, str], uid: int | None = None) -> Listener:
        """Start a canary with one listener per name (name -> host); returns once all of them listen."""
        specs = [f"{name}={host}" for name, host in listeners.items()]
        proc = subprocess.Popen(
            self.exec(ns, [sys.executable, PEER, "listen", *specs], uid),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.processes.append(proc)
        listener = Listener(proc)
        wait_until(lambda: len(listener.ports) == len(specs) or proc.poll() is not None, "the canary listens")
        assert len(listener.ports) == len(specs), listener.raw
        return listener


class Listener:
    """A running canary: the port of each listener, and every `accept` and `request` line, live."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.ports: dict[str, int] = {}
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            event = json.loads(line)
            if event["event"] == "listening":
                self.ports[event["name"]] = event["port"]
            else:
                self.events.append(event)

    def seen(self, name: str, kind: str = "accept") -> list[dict[str, Any]]:
        return [e for e in self.events if e["name"] == name and e["event"] == kind]


def _setup(made: Namespaces, token: str) -> None:
    pod_if, out_if = f"btl-p-{token}", f"btl-o-{token}"
    commands = [
        ["ip", "netns", "add", made.pod],
        ["ip", "netns", "add", made.out],
        [
            "ip",
            "link",
            "add",
            pod_if,
            "netns",
            made.pod,
            "type",
            "veth",
            "peer",
            "name",
            out_if,
            "netns",
            made.out,
        ],
    ]
    for ns, ifname, v4, v6 in ((made.pod, pod_if, POD_V4, POD_V6), (made.out, out_if, OUT_V4, OUT_V6)):
        commands += [
            made.exec(ns, ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=0"]),
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", ifname],
            ["ip", "-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", ifname, "nodad"],
            ["ip", "-n", ns, "link", "set", ifname, "up"],
        ]
    for argv in commands:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"


@contextlib.contextmanager
def pod_and_outside() -> Iterator[Namespaces]:
    """A fresh pair of namespaces; on exit every process started in them is killed and both are deleted
    (which deletes the veth pair with them)."""
    token = secrets.token_hex(3)
    made = Namespaces(pod=f"bt-lock-pod-{token}", out=f"bt-lock-out-{token}")
    try:
        _setup(made, token)
        yield made
    finally:
        for proc in made.processes:
            proc.kill()
            proc.wait(30)
        for ns in (made.pod, made.out):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60)
