"""1 GiB each way through the real gateway process, with its peak memory bounded far below the body size."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from tests.conftest import Upstream
from tests.gateway_process import GatewayProcess

GIB = 1024**3
MEMORY_BOUND_KB = 160 * 1024  # a buffered 1 GiB body could never fit here


async def test_one_gib_upload_and_download_stream_with_bounded_memory(
    tmp_path: Path, upstream: Upstream
) -> None:
    host = upstream.url.split("://")[1]
    gw = GatewayProcess(
        {
            "allowlist": [host],
            "routes": [{"name": "app", "prefix": "/", "upstream": upstream.url}],
            "limits": {"max_body_mb": 2048},
        },
        tmp_path,
    )
    try:
        baseline = gw.peak_rss_kb()
        block = b"u" * 2**18

        async def upload() -> AsyncIterator[bytes]:
            for _ in range(GIB // len(block)):
                yield block

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as client:
            async with client.post(gw.url + "/upload", data=upload()) as resp:
                assert resp.status == 200
                assert (await resp.json())["body_bytes"] == GIB
            received = 0
            async with client.get(gw.url + f"/download/{GIB}") as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(2**18):
                    received += len(chunk)
        assert received == GIB
        peak = gw.peak_rss_kb()
    finally:
        assert gw.stop() == 0
    print(f"gateway peak RSS {peak} kB, baseline {baseline} kB")
    assert peak < baseline + MEMORY_BOUND_KB, f"peak RSS {peak} kB (baseline {baseline} kB)"
