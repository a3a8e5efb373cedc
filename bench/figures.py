"""The measurements themselves: wrk runs, timed curl fetches, RSS sampling, rate-limit decision cost."""

from __future__ import annotations

import gzip
import re
import statistics
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from peers import TOKEN
from upstream import big_json

from gateway.policy.codec import GZIP_LEVEL
from gateway.policy.credentials import digest_of
from gateway.policy.ratelimit import LimitSpec, RateLimiter, RateLimitSettings, rate_key
from gateway.policy.urlrewrite import RuleSet


@dataclass(frozen=True)
class Stat:
    """Median of rounds with their range."""

    median: float
    lo: float
    hi: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[float]) -> Stat:
        return cls(statistics.median(samples), min(samples), max(samples), tuple(samples))


@dataclass(frozen=True)
class Wrk:
    rps: float
    p99_ms: float
    bad: int  # non-2xx responses plus socket errors


def _ms(match: re.Match[str] | None) -> float:
    if match is None:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(port: int, connections: int, duration_s: int, path: str = "/v1/bench") -> Wrk:
    args = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--latency",
        "-H",
        f"Authorization: {TOKEN}",
    ]
    done = subprocess.run(
        [*args, f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=duration_s + 30,
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk on port {port} exited {done.returncode}: {done.stderr or done.stdout}")
    out = done.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"wrk output without Requests/sec:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    bad = int(non2xx.group(1)) if non2xx else 0
    bad += sum(int(g) for g in errors.groups()) if errors else 0
    return Wrk(float(rps.group(1)), _ms(re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)), bad)


def curl(url: str, out: str = "/dev/null", upload: Path | None = None) -> tuple[float, int, int]:
    """Seconds, HTTP status and bytes of one GET (no --compressed: the bytes on the wire are timed); with
    `upload`, of one PUT streaming that file (Content-Length set, no Expect: 100-continue), bytes sent."""
    size = "%{size_upload}" if upload else "%{size_download}"
    args = ["curl", "-s", "-o", out, "-w", f"%{{time_total}} %{{http_code}} {size}", url]
    if upload is not None:
        args += ["-T", str(upload), "-H", "Expect:", "-H", f"Authorization: {TOKEN}"]
    done = subprocess.run(args, capture_output=True, text=True, check=True, timeout=300)
    seconds, status, count = done.stdout.split()
    return float(seconds), int(status), int(count)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def curl_rss(
    pid: int, url: str, out: str = "/dev/null", upload: Path | None = None
) -> tuple[float, float, int, int]:
    """`curl(url, out, upload)` while sampling `pid`'s RSS every 50 ms: (seconds, max growth MB, status,
    bytes)."""
    before = rss_kb(pid)
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.05):
            peak = max(peak, rss_kb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        seconds, status, size = curl(url, out, upload)
    finally:
        stop.set()
        sampler.join()
    peak = max(peak, rss_kb(pid))
    return seconds, (peak - before) / 1024, status, size


def codec_floor(upstream_port: int, public_url: str) -> list[float]:
    """The gateway's work on the big JSON body done in-process, no I/O: gzip inflate, the URL rules over the
    whole text, gzip deflate at the gateway's level. A floor for the rewrite-on fetch (3 rounds)."""
    body = gzip.compress(big_json(upstream_port), compresslevel=6)
    rules = RuleSet([(f"http://127.0.0.1:{upstream_port}", public_url)], 2**16)
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        encoder = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        encoder.compress(rules.rewrite_all(gzip.decompress(body)))
        encoder.flush()
        seconds.append(time.perf_counter() - start)
    return seconds


def _key(token: str) -> str:
    key = rate_key(digest_of(f"Bearer {token}"), "127.0.0.1", "client-ip")
    assert isinstance(key, str)
    return key


async def _decisions(limiter: RateLimiter, key: str, count: int) -> tuple[list[float], int]:
    samples: list[float] = []
    allowed = 0
    for _ in range(count):
        start = time.perf_counter()
        decision = await limiter.check("app", key)
        samples.append(time.perf_counter() - start)
        allowed += decision.allowed
    return samples, allowed


def _us(samples: list[float], q: float) -> float:
    return sorted(samples)[int(len(samples) * q)] * 1e6


async def memory_cost(max_requests: int, fill: int, timed: int) -> tuple[float, int]:
    """p50 µs of `timed` decisions for ONE token in memory storage after `fill` untimed ones; and how many
    of the timed ones were allowed."""
    limiter = RateLimiter(RateLimitSettings(default=LimitSpec(max_requests, 60)))
    key = _key("one")
    try:
        await _decisions(limiter, key, fill)
        samples, allowed = await _decisions(limiter, key, timed)
    finally:
        await limiter.close()
    return _us(samples, 0.5), allowed


def redis_processed(port: int) -> int:
    """INFO stats total_commands_processed: every command, those run inside Lua scripts included."""
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "INFO", "stats"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"total_commands_processed:(\d+)", out)
    assert match is not None, out
    return int(match.group(1))


def redis_limiter(port: int) -> RateLimiter:
    storage = f"redis://127.0.0.1:{port}/0"
    return RateLimiter(
        RateLimitSettings(default=LimitSpec(1_000_000, 60), storage=storage, storage_timeout_ms=1000)
    )


@contextmanager
def monitor(port: int, log: Path) -> Iterator[None]:
    """`redis-cli monitor` into `log` for the duration of the block, flushed up to an end marker."""

    def wait_for(marker: bytes) -> None:
        deadline = time.monotonic() + 30
        while marker not in log.read_bytes():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"redis-cli monitor: no {marker!r} in {log}")
            time.sleep(0.01)

    with open(log, "wb") as out:
        proc = subprocess.Popen(["redis-cli", "-p", str(port), "monitor"], stdout=out)
    try:
        wait_for(b"OK")
        yield
        subprocess.run(["redis-cli", "-p", str(port), "echo", "bench-end"], capture_output=True, check=True)
        wait_for(b"bench-end")
    finally:
        proc.kill()
        proc.wait()


def client_commands(log: Path) -> dict[str, int]:
    """Commands clients sent, by name, in a MONITOR log (those run inside Lua scripts left out)."""
    sent: dict[str, int] = {}
    for match in re.finditer(r'\[\d+ ([^\]]+)\] "([^"]+)"', log.read_text(errors="replace")):
        name = match.group(2).lower()
        if match.group(1) != "lua" and name != "echo":
            sent[name] = sent.get(name, 0) + 1
    return sent


async def redis_cost(port: int, count: int, log: Path) -> tuple[float, float, float, float, dict[str, int]]:
    """For one token at 1,000,000/min in Redis storage: p50 and p99 µs of `count` decisions; the commands
    Redis executed per decision (INFO stats, Lua-internal ones included); and, in a second untimed pass
    under MONITOR, the commands the client sent per decision (its round trips), by name."""
    limiter = redis_limiter(port)
    key = _key("redis")
    try:
        _, warm = await _decisions(limiter, key, 50)  # connects and loads the script
        before = redis_processed(port)
        samples, allowed = await _decisions(limiter, key, count)
        executed = (redis_processed(port) - before - 1) / count  # less the first INFO itself
        with monitor(port, log):
            await _decisions(limiter, key, count)
    finally:
        await limiter.close()
    if warm != 50 or allowed != count:
        raise RuntimeError(f"Redis limiter refused or failed: {allowed}/{count} allowed (storage error?)")
    sent = client_commands(log)
    return _us(samples, 0.5), _us(samples, 0.99), executed, sum(sent.values()) / count, sent
