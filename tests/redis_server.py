"""Real redis-server processes on free loopback ports, started and stopped by the test that needs them:
a single server (optionally with a password, or TLS only), a master with a replica and a sentinel, and a
three-node cluster. `redis-cli` reads what the tests check (TTL, MEMORY USAGE, KEYS per node).

Missing binary: the test is skipped on a developer machine, but fails under CI=true, where a skipped
Redis test would hide a broken shared-limit feature.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.clients import free_port
from tests.tools import require_binaries

START_TIMEOUT_S = 10


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"redis-server did not listen on {port}")


class RedisServer:
    """One redis-server; `args` are extra config directives (`--requirepass x`, `--replicaof h p`, ...).

    `tls`: (cert, key, ca) files; the server then speaks TLS only, on `port`. `config_file` comes first on
    the command line, as redis-server wants it (a sentinel's).
    """

    def __init__(
        self,
        workdir: Path,
        args: Sequence[str] = (),
        tls: tuple[Path, Path, Path] | None = None,
        password: str | None = None,
        config_file: Path | None = None,
    ) -> None:
        binaries = require_binaries("redis-server", "redis-cli")
        self.binary, self.cli_binary = binaries["redis-server"], binaries["redis-cli"]
        self.workdir = workdir
        self.port = free_port()
        self.args = tuple(args)
        self.tls = tls
        self.password = password
        self.config_file = [str(config_file)] if config_file is not None else []
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def _listen_args(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        cert, key, ca = self.tls
        files = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca)]
        return ["--port", "0", "--tls-port", str(self.port), *files, "--tls-auth-clients", "no"]

    def start(self) -> None:
        auth = ["--requirepass", self.password] if self.password else []
        plain = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(
            [self.binary, *self.config_file, *self._listen_args(), *plain, *auth, *self.args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port)

    def cli(self, *command: str) -> str:
        """One command through redis-cli (-c follows a cluster's redirections); its output, stripped."""
        flags = ["-p", str(self.port), "-c"]
        if self.tls is not None:
            flags += ["--tls", "--cacert", str(self.tls[2])]
        env = {"REDISCLI_AUTH": self.password} if self.password else None
        done = subprocess.run(
            [self.cli_binary, *flags, *command], capture_output=True, text=True, timeout=10, env=env
        )
        return done.stdout.strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


class RedisSentinel:
    """A master, one replica and one sentinel watching them as `mymaster`; a dead master is replaced
    within about a second (down-after-milliseconds 500, quorum 1)."""

    MASTER = "mymaster"

    def __init__(self, workdir: Path) -> None:
        (workdir / "master").mkdir()
        (workdir / "replica").mkdir()
        self.master = RedisServer(workdir / "master")
        self.replica = RedisServer(workdir / "replica", ["--replicaof", "127.0.0.1", str(self.master.port)])
        self.sentinel = RedisServer(workdir, ["--sentinel"], config_file=self._config(workdir))
        self._wait_until_watched()

    def _config(self, workdir: Path) -> Path:
        path = workdir / "sentinel.conf"  # sentinel rewrites its config file: it must be its own
        path.write_text(
            f"sentinel monitor {self.MASTER} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.MASTER} 500\n"
            f"sentinel failover-timeout {self.MASTER} 2000\n"
        )
        return path

    def _wait_until_watched(self) -> None:
        """Until the sentinel knows the replica (it learns it from the master's INFO) and it is in sync."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            replicas = self.sentinel.cli("SENTINEL", "REPLICAS", self.MASTER)
            if str(self.replica.port) in replicas and "master_link_status:up" in self.replica.cli("INFO"):
                return
            time.sleep(0.05)
        raise RuntimeError("sentinel did not see the replica")

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.MASTER}"

    def master_port(self) -> int:
        """The master's port as the sentinel answers it now."""
        return int(self.sentinel.cli("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER).split()[-1])

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.stop()


class RedisCluster:
    """Three masters (`--cluster-enabled yes`), no replicas, every slot assigned."""

    def __init__(self, workdir: Path) -> None:
        self.nodes: list[RedisServer] = []
        for index in range(3):
            node_dir = workdir / f"node{index}"
            node_dir.mkdir()
            args = ["--cluster-enabled", "yes", "--cluster-port", str(free_port())]
            self.nodes.append(RedisServer(node_dir, [*args, "--cluster-config-file", "nodes.conf"]))
        hosts = [f"127.0.0.1:{node.port}" for node in self.nodes]
        create = ["--cluster", "create", *hosts, "--cluster-replicas", "0", "--cluster-yes"]
        subprocess.run(
            [self.nodes[0].cli_binary, *create],
            capture_output=True,
            check=True,
            timeout=30,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all("cluster_state:ok" in node.cli("CLUSTER", "INFO") for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
