"""Cost of one rate-limit decision (p50/p99, microseconds) with memory and local Redis storage, and the
memory held by 100k distinct tokens at 100/min in memory storage. Bounded: fixed counts, local only."""

from __future__ import annotations

import asyncio
import gc
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.policy.credentials import digest_of
from gateway.policy.ratelimit import LimitSpec, RateLimiter, RateLimitSettings, rate_key

CHECKS = 20_000
TOKENS = 100_000


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2] * 1e6, ordered[int(len(ordered) * 0.99)] * 1e6


async def cost(storage: str, checks: int) -> tuple[float, float]:
    limiter = RateLimiter(
        RateLimitSettings(default=LimitSpec(100, 60), storage=storage, storage_timeout_ms=1000)
    )
    keys = [rate_key(digest_of(f"Bearer token-{i}"), "127.0.0.1", "client-ip") for i in range(1000)]
    samples = []
    for i in range(checks):
        key = keys[i % len(keys)]
        assert isinstance(key, str)
        start = time.perf_counter()
        await limiter.check("app", key)
        samples.append(time.perf_counter() - start)
    await limiter.close()
    return percentiles(samples)


async def memory_per_tokens() -> float:
    gc.collect()
    tracemalloc.start()
    limiter = RateLimiter(RateLimitSettings(default=LimitSpec(100, 60)))
    before = tracemalloc.get_traced_memory()[0]
    for i in range(TOKENS):
        key = rate_key(digest_of(f"Bearer token-{i}"), "127.0.0.1", "client-ip")
        assert isinstance(key, str)
        await limiter.check("app", key)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held / 2**20


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes], int] | None:
    if shutil.which("redis-server") is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.02)
    proc.kill()
    return None


async def main() -> None:
    print(f"rate-limit decision cost, moving-window 100/min, {CHECKS} checks over 1000 tokens")
    print(f"{'storage':<12}{'p50 us':>10}{'p99 us':>10}")
    p50, p99 = await cost("memory://", CHECKS)
    print(f"{'memory':<12}{p50:>10.1f}{p99:>10.1f}")
    with tempfile.TemporaryDirectory() as workdir:
        redis = start_redis(workdir)
        if redis is None:
            print(f"{'redis':<12}{'(redis-server not installed)':>20}")
        else:
            proc, port = redis
            try:
                p50, p99 = await cost(f"redis://127.0.0.1:{port}/0", CHECKS // 4)
                print(f"{'redis':<12}{p50:>10.1f}{p99:>10.1f}")
            finally:
                proc.kill()
                proc.wait()
    held = await memory_per_tokens()
    print(f"memory held by {TOKENS} tokens (1 request each) in memory storage: {held:.1f} MiB")


if __name__ == "__main__":
    asyncio.run(main())
