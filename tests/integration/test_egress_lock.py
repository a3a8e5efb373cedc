"""`bt-gateway egress-lock` for real: the shipped rules, installed by the real CLI in a pod's namespace.

A pod and the outside are two network namespaces (tests/netns.py). Outside, canaries count every
accept. In the pod, the real gateway runs as the image's UID (10001) and the "app" as another (10002).
The same direct connection that reaches the outside before the lock is rejected after it, while the
gateway's requests still arrive, and the gateway's own allow-list still decides where it may go.
Needs root, ip, setpriv and iptables (nft backend): skipped without them, failed under CI=true.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.egress_apply import dry_run
from gateway.egress_lock import CHAIN, LockSpec, parse_allow
from tests.clients import run_cli
from tests.gateway_process import GatewayProcess
from tests.netns import OUT_V4, OUT_V6, POD_V4, Listener, Namespaces, pod_and_outside, wait_until
from tests.tools import require_binaries, unavailable

GATEWAY_UID, APP_UID = 10001, 10002
LOCK = str(Path(sys.executable).parent / "bt-gateway")


@dataclass
class Pod:
    ns: Namespaces
    outside: Listener  # on: allow-listed in the gateway; off: not; db: --allow'ed for the app
    gateway: GatewayProcess

    def app(self, *args: str) -> dict[str, object]:
        return self.ns.peer(self.ns.pod, *args, uid=APP_UID)

    def lock(self, *allow: str) -> subprocess.CompletedProcess[str]:
        argv = [LOCK, "egress-lock", "--gateway-uid", str(GATEWAY_UID)]
        for value in allow:
            argv += ["--allow", value]
        return self.ns.run(self.ns.pod, argv)

    def saved(self, tool: str) -> list[str]:
        done = self.ns.run(self.ns.pod, [tool, "-t", "filter"])
        assert done.returncode == 0, done.stderr
        return [line for line in done.stdout.splitlines() if CHAIN in line]

    def port(self, name: str) -> int:
        return self.outside.ports[name]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """The gateway's config where UID 10001 can read it (pytest's tmp_path is root's alone)."""
    with tempfile.TemporaryDirectory(prefix="bt-lock-") as path:
        os.chmod(path, 0o755)
        yield Path(path)


@pytest.fixture
def pod(shared_dir: Path) -> Iterator[Pod]:
    require_binaries(
        "ip", "setpriv", "iptables-restore", "ip6tables-restore", "iptables-save", "ip6tables-save"
    )
    if os.geteuid() != 0:
        unavailable("egress-lock needs root: network namespaces and iptables")
    if os.stat(sys.executable).st_mode & stat.S_IXOTH == 0:
        unavailable(f"{sys.executable} is not executable by other users (the gateway runs as {GATEWAY_UID})")
    with pod_and_outside() as ns:
        listeners = {"on": OUT_V4, "on6": OUT_V6, "off": OUT_V4, "db": OUT_V4, "db6": OUT_V6}
        outside = ns.listen(ns.out, listeners)
        on, on6, off = outside.ports["on"], outside.ports["on6"], outside.ports["off"]
        config = {
            "allowlist": [f"{OUT_V4}:{on}", f"[{OUT_V6}]:{on6}"],
            "routes": [
                {"name": "v4", "prefix": "/v4", "upstream": f"http://{OUT_V4}:{on}"},
                {"name": "v6", "prefix": "/v6", "upstream": f"http://[{OUT_V6}]:{on6}"},
            ],
            "forward_proxy": {"enabled": True, "connect_ports": [on, off]},  # the port is not what refuses
        }
        prefix = ns.exec(ns.pod, [], uid=GATEWAY_UID)
        gateway = GatewayProcess(config, shared_dir, prefix=prefix)
        (shared_dir / "gateway.yaml").chmod(0o644)  # written before the start; read by the gateway at start
        try:
            yield Pod(ns=ns, outside=outside, gateway=gateway)
        finally:
            gateway.stop()


def test_only_the_gateway_leaves_a_locked_pod(pod: Pod) -> None:
    on, on6, off = pod.port("on"), pod.port("on6"), pod.port("off")
    db, db6 = pod.port("db"), pod.port("db6")
    # (d) Without the lock the app reaches the outside directly, over IPv4 and IPv6.
    assert pod.app("connect", OUT_V4, str(on)) == {"event": "connected"}
    assert pod.app("connect", OUT_V6, str(on6)) == {"event": "connected"}
    wait_until(lambda: len(pod.outside.seen("on")) == 1 and len(pod.outside.seen("on6")) == 1, "2 accepts")

    done = pod.lock(f"{OUT_V4}:{db}", f"[{OUT_V6}]:{db6}")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"egress-lock: chain {CHAIN} installed (IPv4 7 rules, IPv6 11 rules): only uid {GATEWAY_UID} leaves "
        "the pod; also open: loopback, established connections, allowed destinations: "
        f"{OUT_V4}/32:{db}, [{OUT_V6}/128]:{db6}\n"
    )
    # Neighbour discovery must start afresh under the lock: the gateway's IPv6 below needs it to pass.
    assert pod.ns.run(pod.ns.pod, ["ip", "neigh", "flush", "all"]).returncode == 0

    # (a) Now the same connections are refused at once (a TCP reset from the rule), over IPv4 and IPv6.
    refused = {"event": "error", "error": "ConnectionRefusedError", "errno": 111}
    assert pod.app("connect", OUT_V4, str(on)) == refused
    assert pod.app("connect", OUT_V6, str(on6)) == refused
    assert pod.app("connect", OUT_V4, str(off)) == refused

    # (b) The same destinations through the gateway: they arrive. The canary answers in accept order, so
    # these requests being its next accepts shows the refused attempts never reached it.
    gateway = pod.gateway.port
    assert pod.app("get", "127.0.0.1", str(gateway), "/v4/x") == {
        "event": "response",
        "status": 200,
        "body": "canary on",
    }
    assert pod.app("get", "127.0.0.1", str(gateway), "/v6/y") == {
        "event": "response",
        "status": 200,
        "body": "canary on6",
    }
    wait_until(lambda: len(pod.outside.seen("on6", "request")) == 1, "the IPv6 request arrives")
    assert [e["event"] for e in pod.outside.events if e["name"] == "on"] == ["accept", "accept", "request"]
    assert [e["event"] for e in pod.outside.events if e["name"] == "on6"] == ["accept", "accept", "request"]
    assert [e["line"] for e in pod.outside.seen("on", "request")] == ["GET /x HTTP/1.1"]

    # (c) The gateway's own allow-list still rules: off the list is 403, and nothing arrives, although
    # its UID may pass the lock (a process of that UID connects directly: that one does arrive).
    target = f"{OUT_V4}:{off}"
    assert pod.app("connect-via", "127.0.0.1", str(gateway), target)["status"] == 403
    assert pod.ns.peer(pod.ns.pod, "connect", OUT_V4, str(off), uid=GATEWAY_UID) == {"event": "connected"}
    wait_until(lambda: len(pod.outside.seen("off")) == 1, "the gateway UID's direct connection arrives")
    assert pod.outside.seen("off") == [{"event": "accept", "name": "off"}]  # the only one

    # --allow: the app's own dependencies stay reachable directly (TCP here; UDP has the same rule).
    assert pod.app("connect", OUT_V4, str(db)) == {"event": "connected"}
    assert pod.app("connect", f"{OUT_V6}", str(db6)) == {"event": "connected"}


def test_the_app_still_serves_its_own_traffic(pod: Pod) -> None:
    """Replies on connections the pod accepted pass (conntrack ESTABLISHED), whichever UID answers."""
    served = pod.ns.listen(pod.ns.pod, {"app": POD_V4}, uid=APP_UID)
    assert pod.lock().returncode == 0
    reply = pod.ns.peer(pod.ns.out, "get", POD_V4, str(served.ports["app"]), "/")
    assert reply == {"event": "response", "status": 200, "body": "canary app"}
    assert pod.app("connect", OUT_V4, str(pod.port("on"))) == {
        "event": "error",
        "error": "ConnectionRefusedError",
        "errno": 111,
    }


def test_running_it_twice_leaves_one_copy_of_the_rules(pod: Pod) -> None:
    assert pod.lock("10.0.0.0/8").returncode == 0
    first = {tool: pod.saved(tool) for tool in ("iptables-save", "ip6tables-save")}
    assert first["iptables-save"].count(f"-A OUTPUT -j {CHAIN}") == 1
    second = pod.lock("10.0.0.0/8")
    assert second.returncode == 0, second.stderr
    assert {tool: pod.saved(tool) for tool in first} == first
    # A changed allow-list replaces the old one rather than adding to it.
    assert pod.lock("192.0.2.0/24").returncode == 0
    rules = pod.saved("iptables-save")
    assert [line for line in rules if "-d " in line] == [f"-A {CHAIN} -d 192.0.2.0/24 -j RETURN"]
    assert rules.count(f"-A OUTPUT -j {CHAIN}") == 1
    assert pod.saved("ip6tables-save").count(f"-A OUTPUT -j {CHAIN}") == 1


def test_the_app_cannot_change_the_lock(pod: Pod) -> None:
    """Without NET_ADMIN (the app's UID here) the lock cannot be replaced or removed: one line, exit 1."""
    assert pod.lock().returncode == 0
    before = pod.saved("iptables-save")
    done = pod.ns.run(
        pod.ns.pod, [LOCK, "egress-lock", "--allow", "0.0.0.0/1"], uid=APP_UID
    )  # half the world
    assert done.returncode == 1 and done.stdout == ""
    assert re.fullmatch(  # one line; the iptables version is the machine's
        r"bt-gateway egress-lock: iptables-save failed with exit code 4: "
        r"iptables-save v[\d.]+ \(nf_tables\): "
        r"Could not fetch rule set generation id: Permission denied \(you must be root\) "
        r"\(needs root with CAP_NET_ADMIN in the pod's network namespace\)\n",
        done.stderr,
    )
    flush = pod.ns.run(pod.ns.pod, ["iptables", "-F", CHAIN], uid=APP_UID)
    assert flush.returncode != 0
    assert pod.saved("iptables-save") == before


def test_without_iptables_it_says_so_in_one_line_and_exits_1() -> None:
    done = run_cli("egress-lock", env={"PATH": "/nonexistent"})
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "bt-gateway egress-lock: iptables-save not found: install the iptables package "
        "(Debian: apt-get install iptables)\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--allow", "10.0.0.1/8"],
            "--allow '10.0.0.1/8': host bits are set after the prefix; the network is 10.0.0.0/8",
        ),
        (
            ["--allow", "<DNS_SERVICE_IP>:53"],
            "--allow '<DNS_SERVICE_IP>:53': '<DNS_SERVICE_IP>' is not an IP address "
            "(names are not resolved: give addresses)",
        ),
        (["--gateway-uid", "0"], "--gateway-uid 0: a UID from 1 up (0 would exempt root)"),
    ],
)
def test_usage_errors_exit_2_in_one_line_before_touching_anything(args: list[str], message: str) -> None:
    """The manifest's placeholders among them: a pod applied without setting them waits, unlocked nowhere."""
    done = run_cli("egress-lock", *args, env={"PATH": "/nonexistent"})  # never reaches iptables
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"bt-gateway egress-lock: {message}\n")


def test_dry_run_prints_the_rules_without_root_or_iptables() -> None:
    done = run_cli("egress-lock", "--dry-run", "--allow", "10.96.0.10:53", env={"PATH": "/nonexistent"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == dry_run(LockSpec(10001, (parse_allow("10.96.0.10:53"),)))
    assert done.stdout.count("COMMIT\n") == 2
