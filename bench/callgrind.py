"""Figure 7: CPU instructions per proxied request, counted by callgrind, for the gateway with its default
policies and for the bare aiohttp proxy (bench/bare_proxy.py), both in front of nginx's static body.

A count of instructions does not move with the machine's load or clock, unlike req/s: it shows what a
change to the code costs or saves. Each process runs under `valgrind --tool=callgrind` as it runs in
production (uvloop, Python's own allocator), uninstrumented until warmed up; then for each batch the
counters are zeroed, exactly that many GETs are sent through CONNECTIONS keep-alive connections (every
answer must be a 200) and the counters are dumped. Batches of N and 2N requests give the per-request slope
(Ir(2N) - Ir(N)) / N, free of what a batch costs whatever its size (the control requests, the idle loop
between them).

`python bench/callgrind.py --annotate [--requests N]` measures the gateway alone, keeps its callgrind
files and prints the top functions by inclusive cost (`callgrind_annotate --inclusive=yes`; by self cost
with --self). They are C functions: CPython's, uvloop's, aiohttp's and the other extensions'.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from peers import TOKEN, Peers, free_port, gateway_config, small_body

REQUESTS = int(os.environ.get("BENCH_CG_REQUESTS", "1000"))  # N: the batches are N and 2N requests
CONNECTIONS = 4
WARM_UP = 200  # requests before instrumentation, then as many again after it (new translations)
GATEWAY = "bt-gateway default policies"
BARE = "reference: bare aiohttp proxy, no policies"
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Start = Callable[[Sequence[str]], subprocess.Popen[bytes]]


@dataclass(frozen=True)
class Counted:
    """The instructions (Ir) callgrind counted over each batch, and the files it dumped them in."""

    requests: tuple[int, ...]
    instructions: tuple[int, ...]
    files: tuple[Path, ...]

    @property
    def per_request(self) -> float:
        """Ir / requests of the first batch: fixed costs included."""
        return self.instructions[0] / self.requests[0]

    @property
    def slope(self) -> float:
        """Extra Ir per extra request from the first batch to the last: fixed costs left out."""
        return (self.instructions[-1] - self.instructions[0]) / (self.requests[-1] - self.requests[0])


def under_callgrind(out: Path) -> list[str]:
    """valgrind's command line: counting nothing until switched on, so start-up runs at a few times slower
    rather than fifty."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=60)


def total_instructions(path: Path) -> int:
    """The `summary:` (else `totals:`) line of a callgrind file: the dump's Ir, all threads."""
    deadline = time.monotonic() + 30
    while True:
        text = path.read_text() if path.exists() else ""
        for key in ("summary:", "totals:"):
            match = re.search(rf"^{key}\s+(\d+)", text, re.MULTILINE)
            if match:
                return int(match.group(1))
        if time.monotonic() > deadline:
            raise RuntimeError(f"no summary: or totals: line in {path}")
        time.sleep(0.1)


async def _get(stream: Stream, request: bytes) -> int:
    """One request on a kept-alive connection; the status, once the whole body is read."""
    reader, writer = stream
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = _LENGTH.search(head)
    if length is None:
        raise RuntimeError(f"a response without Content-Length: {head[:300]!r}")
    await reader.readexactly(int(length.group(1)))
    return int(head.split(None, 2)[1])


async def _batch(streams: list[Stream], request: bytes, count: int) -> Counter[int]:
    """Exactly `count` requests, one at a time on each connection: statuses counted."""

    async def one(stream: Stream, share: int) -> list[int]:
        return [await _get(stream, request) for _ in range(share)]

    shares = [count // len(streams) + (i < count % len(streams)) for i in range(len(streams))]
    done = await asyncio.gather(*(one(s, share) for s, share in zip(streams, shares, strict=True)))
    return Counter(status for statuses in done for status in statuses)


async def _count(pid: int, port: int, out: Path, batches: Sequence[int]) -> Counted:
    request = f"GET /v1/bench HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {TOKEN}\r\n\r\n".encode()
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS)]
    instructions: list[int] = []
    files: list[Path] = []
    try:
        await _batch(streams, request, WARM_UP)  # pools, caches, the first connections upstream
        control(pid, "-i", "on")
        await _batch(streams, request, WARM_UP)  # the code is translated anew with instrumentation
        for count in batches:
            control(pid, "-z")
            statuses = await _batch(streams, request, count)
            control(pid, "-d")
            if statuses != {200: count}:
                raise RuntimeError(f"{count} requests under callgrind answered {dict(statuses)}")
            files.append(Path(f"{out}.{len(files) + 1}"))  # callgrind numbers its dumps from 1
            instructions.append(total_instructions(files[-1]))
    finally:
        for _, writer in streams:
            writer.close()
    return Counted(tuple(batches), tuple(instructions), tuple(files))


def count(start: Start, port: int, out: Path, batches: Sequence[int]) -> Counted:
    """Starts a process with `start(wrap)` under callgrind (listening on `port`) and counts its batches."""
    proc = start(under_callgrind(out))
    return asyncio.run(_count(proc.pid, port, out, batches))


def measure(tmp: Path, names: Sequence[str], requests: int = REQUESTS) -> dict[str, Counted]:
    """Batches of `requests` and twice as many through each of `names` (GATEWAY, BARE), one after the
    other, in front of one nginx."""
    peers = Peers(tmp)
    counted: dict[str, Counted] = {}
    try:
        up = free_port()
        peers.nginx(up, free_port(), small_body(up))
        batches = (requests, 2 * requests)
        ports = {GATEWAY: free_port(), BARE: free_port()}
        config = gateway_config(ports[GATEWAY], up)  # as figure 1's "bt-gateway default policies"
        starts: dict[str, Start] = {
            GATEWAY: lambda wrap: peers.gateway("gw-callgrind", config, wrap),
            BARE: lambda wrap: peers.bare_proxy(ports[BARE], up, wrap),
        }
        for name in names:
            counted[name] = count(starts[name], ports[name], tmp / f"callgrind-{len(counted)}.out", batches)
    finally:
        peers.close()
    return counted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--annotate", action="store_true", help="print the gateway's top functions")
    parser.add_argument("--requests", type=int, default=REQUESTS, help="N (batches of N and 2N requests)")
    parser.add_argument("--top", type=int, default=40, help="functions to print")
    parser.add_argument("--self", action="store_true", help="rank by self cost, not inclusive")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bt-callgrind-"))
    names = [GATEWAY] if args.annotate else [GATEWAY, BARE]
    for name, counted in measure(tmp, names, args.requests).items():
        print(
            f"{name}: {counted.slope:,.0f} Ir/request (slope {counted.requests[0]}->{counted.requests[-1]}), "
            f"{counted.per_request:,.0f} at {counted.requests[0]}"
        )
    if not args.annotate:
        shutil.rmtree(tmp, ignore_errors=True)
        return 0
    last = counted.files[-1]
    annotate = ["callgrind_annotate", f"--inclusive={'no' if args.self else 'yes'}", str(last)]
    lines = subprocess.run(annotate, capture_output=True, text=True, check=True).stdout.splitlines()
    table = next(i for i, line in enumerate(lines) if line.lstrip().startswith("Ir")) + 2
    print("\n".join(lines[: table + args.top]))
    print(f"callgrind files kept in {tmp}; the {counted.requests[-1]}-request batch: {last}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
