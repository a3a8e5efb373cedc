"""Bounded soak run: does the gateway keep its memory and file descriptors flat under a hostile mix?

A proxy that leaks one socket per refused request, or a few KiB per aborted download, passes every unit
test and dies after a week in production. This script runs the real `bt-gateway serve` subprocess for a
bounded time against real peers and compares its resident memory (VmRSS) and open file descriptors
(/proc/<pid>/fd) before and after.

Everything listens on 127.0.0.1, in this process (asyncio) except the gateway itself:

- a normal upstream (`tests/upstream_app.py`, served by aiohttp),
- a hostile raw upstream: a status line above 599 and a gzip bomb (256 MiB of zeros in a few hundred KiB,
  sent as `application/json` with `Content-Encoding: gzip`, so the rewriter must refuse to inflate it),
- a closed port (a bound socket that never listens), for a route whose upstream refuses connections.

The mix, from MIX_WORKERS concurrent workers: GET/POST/404 through the `app` route (most of the traffic),
per-token 429s on a rate-limited route, absolute-form requests to a host off the allow-list (403), a dead
upstream (502), the hostile upstream (502 and the bomb, read fully without inflating it) and aborted
100 MiB downloads. SLOW_WORKERS more run the slow cases: clients that send half a request head (408 after
`header_timeout_s`) and clients that give up on a request the upstream never answers.

Phases: warm-up (WARMUP_S, so caches, pools and the allocator reach their working size), settle, START
snapshot, the measured mix (`--seconds` / `--max-requests`, whichever runs out first), settle, END snapshot,
SIGTERM. Both snapshots are taken on an idle gateway after the same settling time, so the pooled upstream
connections and buffers a busy gateway holds legitimately count the same on both sides.

Verdict: `soak: PASS` when RSS grew by at most 10% of START, open fds by at most 10% of START or 10 fds
(whichever is more: small numbers move), the gateway logged no unhandled error or traceback, and it
exited 0 after SIGTERM. Otherwise `soak: FAIL` and exit status 1.

Run: `.venv/bin/python bench/soak.py [--seconds N] [--max-requests N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import socket
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.gateway_process import GatewayProcess  # noqa: E402
from tests.upstream_app import Recorder, make_app  # noqa: E402

HOST = "127.0.0.1"
DEFAULT_SECONDS = 120
MAX_SECONDS = 600
DEFAULT_REQUESTS = 1_000_000
MAX_REQUESTS = 1_000_000

MIX_WORKERS = 28
SLOW_WORKERS = 4
WARMUP_S = 5.0
SETTLE_S = 3.0
SCENARIO_TIMEOUT_S = 15.0  # no single request of the mix may hold a worker longer than this
HANG_WAIT_S = 0.5  # how long a client waits on /hang before it gives up
HEADER_TIMEOUT_S = 2
BODY_TIMEOUT_S = 2
RSS_SLACK = 0.10
FD_SLACK = 0.10
FD_SLACK_ABS = 10

BOMB_INFLATED = 256 * 2**20
DOWNLOAD_SIZE = 100 * 2**20
ABORT_AFTER = 2**16
POST_BODY = b"x" * 16_384
LIMITED_TOKENS = 4
KEEP_EVENTS = 10_000  # non-access log events kept for the report; access events are only counted
UPSTREAM_IDLE_S = 60.0  # the hostile upstream drops a kept-alive connection idle this long

BAD_STATUS = b"HTTP/1.1 600 X\r\nContent-Length: 2\r\n\r\nok"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


# ---------------------------------------------------------------------------------------------- peers


def gzip_bomb(size: int) -> bytes:
    """`size` zero bytes gzipped at level 9 without ever holding them: about size / 1000 bytes."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(2**20)
    return b"".join(packer.compress(block) for _ in range(size // len(block))) + packer.flush()


def bomb_reply(bomb: bytes) -> bytes:
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        f"Content-Length: {len(bomb)}\r\n\r\n"
    )
    return head.encode() + bomb


async def forget_requests(recorder: Recorder) -> None:
    """The Recorder keeps every request it saw; a soak must not measure its own memory growth."""
    while True:
        await asyncio.sleep(1)
        recorder.requests.clear()
        recorder.started.clear()


@contextlib.asynccontextmanager
async def normal_upstream() -> AsyncIterator[int]:
    recorder = Recorder()
    runner = web.AppRunner(
        make_app(recorder), access_log=None, shutdown_timeout=0.5, handler_cancellation=True
    )
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    forgetter = asyncio.create_task(forget_requests(recorder))
    try:
        yield int(runner.addresses[0][1])
    finally:
        forgetter.cancel()
        await runner.cleanup()


async def serve_hostile(
    replies: dict[bytes, bytes], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer each request head (GETs only, so no body to skip) with the bytes its path names."""
    with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        while True:
            async with asyncio.timeout(UPSTREAM_IDLE_S):
                head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            writer.write(replies.get(path, NOT_FOUND))
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def hostile_upstream(bomb: bytes) -> AsyncIterator[int]:
    replies = {b"/bad-status": BAD_STATUS, b"/bomb": bomb_reply(bomb)}
    server = await asyncio.start_server(functools.partial(serve_hostile, replies), HOST, 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port bound but never listening: connecting to it is refused, and nobody else can take it."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        yield int(sock.getsockname()[1])


# -------------------------------------------------------------------------------------------- gateway


def gateway_config(normal: int, hostile: int, dead: int) -> dict[str, Any]:
    def url(port: int) -> str:
        return f"http://{HOST}:{port}"

    return {
        "allowlist": [f"{HOST}:{port}" for port in (normal, hostile, dead)],
        "routes": [
            {"name": "app", "prefix": "/", "upstream": url(normal)},
            {
                "name": "limited",
                "prefix": "/limited",
                "upstream": url(normal),
                "rate_limit": {"max_requests": 5, "window_minutes": 1},
            },
            {"name": "dead", "prefix": "/dead", "upstream": url(dead)},
            {"name": "hostile", "prefix": "/hostile", "upstream": url(hostile)},
        ],
        "rate_limit": {"max_requests": 0},
        "limits": {"header_timeout_s": HEADER_TIMEOUT_S, "body_timeout_s": BODY_TIMEOUT_S},
    }


@dataclass
class LogTally:
    """What the gateway logged, counted as it goes (a long soak logs millions of access lines)."""

    events: Counter[str] = field(default_factory=Counter)
    error_codes: Counter[str] = field(default_factory=Counter)  # `error_code` of access events
    rejected: Counter[str] = field(default_factory=Counter)  # `code` of request_rejected events
    problems: list[str] = field(default_factory=list)  # unhandled errors, tracebacks, non-JSON lines
    kept: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, line: str) -> dict[str, Any] | None:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        with self.lock:
            if not isinstance(event, dict):
                if line.strip() and len(self.problems) < KEEP_EVENTS:
                    self.problems.append(line.rstrip())
                return None
            self._count(event, line)
        return event

    def _count(self, event: dict[str, Any], line: str) -> None:
        name = str(event.get("event"))
        self.events[name] += 1
        if name == "access":
            if event.get("error_code"):
                self.error_codes[str(event["error_code"])] += 1
            return
        if name == "request_rejected":
            self.rejected[str(event.get("code"))] += 1
        is_problem = name == "unhandled_error" or "exception" in event or event.get("level") == "critical"
        if is_problem and len(self.problems) < KEEP_EVENTS:
            self.problems.append(line.rstrip())
        if len(self.kept) < KEEP_EVENTS:
            self.kept.append(event)

    def counts(self) -> tuple[Counter[str], Counter[str], Counter[str], int]:
        """A consistent copy: events, access error codes, rejected codes, problems so far."""
        with self.lock:
            return Counter(self.events), Counter(self.error_codes), Counter(self.rejected), len(self.problems)


class SoakGateway(GatewayProcess):
    """The tests' gateway subprocess, with its log tallied instead of kept line by line."""

    def __init__(self, config: dict[str, Any], tmp_path: Path) -> None:
        self.tally = LogTally()
        try:
            super().__init__(config, tmp_path)
        except StopIteration:  # it exited without a gateway_started event: say what it printed instead
            self.stop()
            said = self.tally.problems[-20:] + [json.dumps(event) for event in self.lines[-5:]]
            raise RuntimeError("gateway did not start:\n" + "\n".join(said)) from None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = self.tally.add(line)
            if event is not None and event.get("event") != "access" and len(self.lines) < KEEP_EVENTS:
                self.lines.append(event)
                if event.get("event") == "gateway_started":
                    self._started.set()
        self._started.set()


@dataclass(frozen=True)
class Snapshot:
    rss_kb: int
    fds: int


def snapshot(pid: int) -> Snapshot:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return Snapshot(rss_kb=rss, fds=len(os.listdir(f"/proc/{pid}/fd")))


# ------------------------------------------------------------------------------------------------ mix


@dataclass
class Budget:
    """Shared by every worker of a phase: a deadline and a request count, whichever runs out first."""

    deadline: float
    max_requests: int
    sent: int = 0

    def take(self) -> bool:
        if self.sent >= self.max_requests or time.monotonic() >= self.deadline:
            return False
        self.sent += 1
        return True


@dataclass(frozen=True)
class Target:
    port: int
    session: aiohttp.ClientSession
    bomb_size: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


Scenario = Callable[[Target, random.Random], Awaitable[str]]


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


async def raw_status(port: int, request: bytes) -> str:
    """Send exact bytes on a fresh connection; read one Content-Length-framed reply; its status."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(content_length(head))
        return head.split(b" ", 2)[1].decode("ascii")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def status_of(target: Target, method: str, path: str, **kwargs: Any) -> str:
    async with target.session.request(method, target.url + path, **kwargs) as resp:
        await resp.read()
        return str(resp.status)


async def app_get(target: Target, rng: random.Random) -> str:
    return await status_of(target, "GET", f"/v1/project/{rng.randrange(10_000)}?limit=10")


async def app_post(target: Target, rng: random.Random) -> str:
    return await status_of(target, "POST", "/v1/rows", data=POST_BODY)


async def app_not_found(target: Target, rng: random.Random) -> str:
    return await status_of(target, "GET", "/status/404")


async def limited(target: Target, rng: random.Random) -> str:
    token = f"soak-token-{rng.randrange(LIMITED_TOKENS)}"
    return await status_of(target, "GET", "/limited/x", headers={"Authorization": f"Bearer {token}"})


async def off_allowlist(target: Target, rng: random.Random) -> str:
    request = b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    return await raw_status(target.port, request)


async def dead_upstream(target: Target, rng: random.Random) -> str:
    return await status_of(target, "GET", "/dead/x")


async def hostile_status(target: Target, rng: random.Random) -> str:
    return await status_of(target, "GET", "/hostile/bad-status")


async def hostile_bomb(target: Target, rng: random.Random) -> str:
    """Read the bomb to its end, still compressed: the gateway must pass it through, not inflate it."""
    async with target.session.get(target.url + "/hostile/bomb", auto_decompress=False) as resp:
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
        short = resp.status == 200 and size != target.bomb_size
        return f"{resp.status} short body" if short else str(resp.status)


async def aborted_download(target: Target, rng: random.Random) -> str:
    async with target.session.get(f"{target.url}/download/{DOWNLOAD_SIZE}") as resp:
        await resp.content.readexactly(ABORT_AFTER)
        resp.close()  # drops the connection mid-body
        return "aborted"


async def slow_head(target: Target, rng: random.Random) -> str:
    """Half a request head, then nothing: the gateway must answer 408 after header_timeout_s."""
    return await raw_status(target.port, b"GET /slow HTTP/1.1\r\nHost: gw\r\nX-Dribble: ")


async def abandoned_hang(target: Target, rng: random.Random) -> str:
    """A request the upstream never answers, given up by the client: the upstream side must be cancelled."""
    try:
        return await status_of(target, "GET", "/hang", timeout=aiohttp.ClientTimeout(total=HANG_WAIT_S))
    except TimeoutError:
        return "abandoned"


MIX: tuple[tuple[Scenario, int], ...] = (
    (app_get, 50),
    (app_post, 15),
    (app_not_found, 5),
    (limited, 6),
    (off_allowlist, 5),
    (dead_upstream, 5),
    (hostile_status, 5),
    (hostile_bomb, 2),
    (aborted_download, 2),
)
SLOW: tuple[Scenario, ...] = (slow_head, abandoned_hang)
EXPECTED: dict[str, frozenset[str]] = {
    "app_get": frozenset({"200"}),
    "app_post": frozenset({"200"}),
    "app_not_found": frozenset({"404"}),
    "limited": frozenset({"200", "429"}),
    "off_allowlist": frozenset({"403"}),
    "dead_upstream": frozenset({"502"}),
    "hostile_status": frozenset({"502"}),
    "hostile_bomb": frozenset({"200"}),
    "aborted_download": frozenset({"aborted"}),
    "slow_head": frozenset({"408"}),
    "abandoned_hang": frozenset({"abandoned"}),
}

Outcomes = Counter[tuple[str, str]]


async def attempt(scenario: Scenario, target: Target, rng: random.Random) -> str:
    """One scenario, bounded in time; an exception is an outcome too (named by its type)."""
    try:
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            return await scenario(target, rng)
    except TimeoutError:
        return "timeout"
    except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
        return type(exc).__name__


async def mix_worker(target: Target, budget: Budget, outcomes: Outcomes, rng: random.Random) -> None:
    scenarios = [scenario for scenario, _ in MIX]
    weights = [weight for _, weight in MIX]
    while budget.take():
        scenario = rng.choices(scenarios, weights)[0]
        outcomes[scenario.__name__, await attempt(scenario, target, rng)] += 1


async def slow_worker(target: Target, budget: Budget, outcomes: Outcomes, rng: random.Random) -> None:
    turn = 0
    while budget.take():
        scenario = SLOW[turn % len(SLOW)]
        turn += 1
        outcomes[scenario.__name__, await attempt(scenario, target, rng)] += 1


async def run_phase(port: int, bomb_size: int, budget: Budget, seed: int) -> Outcomes:
    """Every worker against the gateway until the budget runs out; each phase opens its own clients."""
    outcomes: Outcomes = Counter()
    timeout = aiohttp.ClientTimeout(total=SCENARIO_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        target = Target(port=port, session=session, bomb_size=bomb_size)
        workers = [
            mix_worker(target, budget, outcomes, random.Random(seed + i)) for i in range(MIX_WORKERS)
        ] + [slow_worker(target, budget, outcomes, random.Random(-seed - i)) for i in range(SLOW_WORKERS)]
        await asyncio.gather(*workers)
    return outcomes


# --------------------------------------------------------------------------------------------- report


@dataclass
class Result:
    seconds: float
    warmup_seconds: float
    warmup_sent: int
    max_requests: int
    sent: int
    outcomes: Outcomes
    start: Snapshot
    end: Snapshot
    events: Counter[str]
    error_codes: Counter[str]
    rejected: Counter[str]
    problems: list[str]
    exit_code: int | None


def percent(start: int, end: int) -> float:
    return (end - start) / start * 100 if start else 0.0


def by_count(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counter.most_common()) or "none"


def verdict(result: Result) -> list[str]:
    """Why the soak failed; empty when it passed."""
    reasons = []
    start, end = result.start, result.end
    if end.rss_kb > start.rss_kb * (1 + RSS_SLACK):
        reasons.append(f"RSS grew {percent(start.rss_kb, end.rss_kb):+.1f}% (> {RSS_SLACK:.0%})")
    if end.fds - start.fds > max(start.fds * FD_SLACK, FD_SLACK_ABS):
        reasons.append(f"open fds grew from {start.fds} to {end.fds}")
    if result.problems:
        reasons.append(f"{len(result.problems)} unhandled errors, tracebacks or non-JSON lines in the log")
    if result.exit_code != 0:
        reasons.append(f"gateway exit status after SIGTERM: {result.exit_code}")
    return reasons


def outcome_lines(outcomes: Outcomes) -> list[str]:
    lines = []
    for name, expected in EXPECTED.items():
        seen = Counter({outcome: n for (scenario, outcome), n in outcomes.items() if scenario == name})
        odd = Counter({outcome: n for outcome, n in seen.items() if outcome not in expected})
        note = f"   unexpected: {by_count(odd)}" if odd else ""
        lines.append(f"  {name:<18} {sum(seen.values()):>8}   {by_count(seen)}{note}")
    return lines


def report(result: Result) -> list[str]:
    served = result.events["access"]
    unaccounted = result.sent - served - result.rejected.total()
    start, end = result.start, result.end
    rate = result.sent / result.seconds if result.seconds else 0.0
    stopped_by = "request budget" if result.sent >= result.max_requests else "time"
    lines = [
        f"soak: {MIX_WORKERS} mix + {SLOW_WORKERS} slow workers against bt-gateway on {HOST}",
        f"duration          {result.seconds:.1f} s measured, stopped by the {stopped_by} "
        f"(after a {result.warmup_seconds:.1f} s warm-up of {result.warmup_sent} requests)",
        f"requests sent     {result.sent} ({rate:.0f}/s)",
        f"served (access)   {served} access events",
        f"errors by code    {by_count(result.error_codes)}",
        f"refused heads     {by_count(result.rejected)} (request_rejected: no access event)",
        f"unaccounted       {unaccounted} (sent, minus access events, minus refused heads)",
        f"other log events  {by_count(Counter({k: v for k, v in result.events.items() if k != 'access'}))}",
        "client outcomes   (scenario, count, outcomes)",
        *outcome_lines(result.outcomes),
        f"gateway RSS       START {start.rss_kb / 1024:.1f} MiB   END {end.rss_kb / 1024:.1f} MiB   "
        f"({percent(start.rss_kb, end.rss_kb):+.1f}%)",
        f"gateway fds       START {start.fds}   END {end.fds}   ({percent(start.fds, end.fds):+.1f}%)",
        f"gateway exit      {result.exit_code} after SIGTERM",
    ]
    lines += [f"log problem       {problem[:400]}" for problem in result.problems[:5]]
    reasons = verdict(result)
    lines += [f"failed because    {reason}" for reason in reasons]
    lines.append("soak: FAIL" if reasons else "soak: PASS")
    return lines


# ----------------------------------------------------------------------------------------------- main


def clean_environment() -> None:
    """The gateway inherits this environment; variables meant for another gateway must not steer it."""
    prefixes = ("BT_GATEWAY_", "OUTBOUND_RATE_LIMIT_", "BRAINTRUST_")
    for name in list(os.environ):
        if name.startswith(prefixes) or name == "DISABLE_SYSADMIN_TELEMETRY":
            del os.environ[name]


async def measure(gateway: SoakGateway, bomb_size: int, seconds: int, max_requests: int) -> Result:
    pid = gateway.proc.pid
    warmup_began = time.monotonic()
    warmup = Budget(warmup_began + WARMUP_S, max(1, max_requests // 10))
    await run_phase(gateway.port, bomb_size, warmup, seed=1)
    warmup_seconds = time.monotonic() - warmup_began
    await asyncio.sleep(SETTLE_S)
    start = snapshot(pid)
    events0, codes0, rejected0, _ = gateway.tally.counts()
    began = time.monotonic()
    budget = Budget(began + seconds, max_requests)
    outcomes = await run_phase(gateway.port, bomb_size, budget, seed=1000)
    elapsed = time.monotonic() - began
    await asyncio.sleep(SETTLE_S)
    end = snapshot(pid)
    events1, codes1, rejected1, _ = gateway.tally.counts()
    exit_code = await asyncio.to_thread(gateway.stop)
    return Result(
        seconds=elapsed,
        warmup_seconds=warmup_seconds,
        warmup_sent=warmup.sent,
        max_requests=max_requests,
        sent=budget.sent,
        outcomes=outcomes,
        start=start,
        end=end,
        events=events1 - events0,
        error_codes=codes1 - codes0,
        rejected=rejected1 - rejected0,
        problems=list(gateway.tally.problems),
        exit_code=exit_code,
    )


async def soak(seconds: int, max_requests: int) -> Result:
    bomb = await asyncio.to_thread(gzip_bomb, BOMB_INFLATED)
    async with contextlib.AsyncExitStack() as stack:
        normal = await stack.enter_async_context(normal_upstream())
        hostile = await stack.enter_async_context(hostile_upstream(bomb))
        dead = stack.enter_context(closed_port())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bt-soak-")))
        gateway = await asyncio.to_thread(SoakGateway, gateway_config(normal, hostile, dead), tmp)
        try:
            return await measure(gateway, len(bomb), seconds, max_requests)
        finally:
            await asyncio.to_thread(gateway.stop)  # a no-op once measure() stopped it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=DEFAULT_SECONDS, help="measured mix duration")
    parser.add_argument("--max-requests", type=int, default=DEFAULT_REQUESTS, help="measured mix requests")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be between 1 and {MAX_SECONDS}")
    if not 1 <= args.max_requests <= MAX_REQUESTS:
        parser.error(f"--max-requests must be between 1 and {MAX_REQUESTS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clean_environment()
    # The aborted downloads make our own upstream log "Cannot write to closing transport" tracebacks:
    # expected here, and not the gateway's log, which is the one this run judges.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    hang_guard = args.seconds + WARMUP_S + 2 * SETTLE_S + 4 * SCENARIO_TIMEOUT_S + 60

    async def bounded() -> Result:
        async with asyncio.timeout(hang_guard):
            return await soak(args.seconds, args.max_requests)

    result = asyncio.run(bounded())
    print("\n".join(report(result)), flush=True)
    return 1 if verdict(result) else 0


if __name__ == "__main__":
    sys.exit(main())
