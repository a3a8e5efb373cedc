"""Where an idle connection's memory goes: `python bench/idle_alloc.py [gateway|bare] [CLIENTS] [TUNNELS]`.

The proxy runs under tracemalloc (this script again, as `--traced`: a thread dumps a snapshot to the path
written on its stdin). After warm-up, CLIENTS (default 1,000) keep-alive connections each read one response
and stay idle, then (gateway only) TUNNELS (default 1,000) CONNECT tunnels; the allocation sites that grew,
per connection, are printed by line, then the largest by call stack. nginx is the upstream.
"""

from __future__ import annotations

import asyncio
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from idle import (  # noqa: E402
    EchoTarget,
    Stream,
    bounded,
    idle_gateway_config,
    one_request,
    one_tunnel,
    raise_nofile,
    still_open,
    warm_up,
)
from peers import ROOT, Peers, free_port, small_body, wait_port  # noqa: E402

FRAMES = 12
TOP = 25


def traced(argv: list[str]) -> None:
    """Run the gateway (`gateway ARGS`) or a script (`PATH ARGS`) here, under tracemalloc."""
    tracemalloc.start(FRAMES)

    def snapshots() -> None:
        for line in sys.stdin:
            path = line.strip()
            tracemalloc.take_snapshot().dump(path + ".part")
            os.rename(path + ".part", path)

    threading.Thread(target=snapshots, daemon=True).start()
    sys.argv = argv
    if argv[0] == "gateway":
        runpy.run_module("gateway", run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(argv[0], run_name="__main__")


class Traced:
    """The traced proxy process, asked for snapshots over its stdin."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        with open(log, "wb") as out:
            args = [sys.executable, __file__, "--traced", *argv]
            self.proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.PIPE, stdout=out, stderr=out)
        wait_port(port, self.proc, "traced proxy")

    def snapshot(self, path: Path) -> tracemalloc.Snapshot:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{path}\n".encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + 120
        while not path.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the traced proxy wrote no snapshot")
            time.sleep(0.05)
        ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>")]
        return tracemalloc.Snapshot.load(str(path)).filter_traces(ignore)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def report(title: str, before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, count: int) -> None:
    """The sites that grew, in bytes per connection: by line, then the largest five by call stack."""
    by_line = after.compare_to(before, "lineno")
    total = sum(d.size_diff for d in by_line)
    print(f"\n== {title}: {total / count / 1024:.2f} KB per connection traced ({count:,} connections)")
    for diff in by_line[:TOP]:
        frame = diff.traceback[0]
        site = f"{frame.filename.replace(str(ROOT) + '/', '')}:{frame.lineno}"
        print(f"{diff.size_diff / count:9.0f} B {diff.count_diff / count:6.2f} blocks  {site}")
    for diff in after.compare_to(before, "traceback")[:5]:
        print(f"\n{diff.size_diff / count:.0f} B per connection from:")
        for line in diff.traceback.format(most_recent_first=True)[: 2 * FRAMES]:
            print("   ", line.replace(str(ROOT) + "/", ""))


async def session(
    proxy: Traced, port: int, target: int | None, *, counts: tuple[int, int], tmp: Path
) -> None:
    """Warm up, then CLIENTS idle connections and TUNNELS idle tunnels (`counts`), reported as they stand."""
    clients, tunnels = counts
    streams: list[Stream] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoTarget, "127.0.0.1", target) if target else None
    try:
        await warm_up(port)
        warm = proxy.snapshot(tmp / "warm")
        streams += await bounded(clients, lambda: one_request(port))
        still_open(streams)
        idle = proxy.snapshot(tmp / "clients")
        report("idle keep-alive client connections", warm, idle, clients)
        if target:
            streams += await bounded(tunnels, lambda: one_tunnel(port, target))
            still_open(streams)
            report("idle tunnels", idle, proxy.snapshot(tmp / "tunnels"), tunnels)
    finally:
        for _, writer in streams:
            writer.close()
        if server is not None:
            server.close()


def main(which: str, clients: int, tunnels: int) -> None:
    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="bt-idle-alloc-"))
    peers = Peers(tmp)
    proxy = None
    try:
        up, port, target = free_port(), free_port(), free_port()
        peers.nginx(up, free_port(), small_body(up))
        if which == "gateway":
            config = peers.write_config("gw", idle_gateway_config(port, up, target))
            proxy = Traced(["gateway", "serve", "-c", str(config)], port, tmp / "gw.log")
        else:
            proxy = Traced([str(HERE / "bare_proxy.py"), str(port), str(up)], port, tmp / "bare.log")
        tunnel_target = target if which == "gateway" else None
        asyncio.run(session(proxy, port, tunnel_target, counts=(clients, tunnels), tmp=tmp))
    finally:
        if proxy is not None:
            proxy.stop()
        peers.close()
        print(f"\nsnapshots and logs in {tmp}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--traced"]:
        traced(sys.argv[2:])
    else:
        given = sys.argv[1:4]
        which, clients, tunnels = given + ["gateway", "1000", "1000"][len(given) :]
        main(which, int(clients), int(tunnels))
