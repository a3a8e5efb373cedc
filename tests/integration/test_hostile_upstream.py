"""A hostile upstream can neither make the gateway relay invalid HTTP nor blow up its memory or loop."""

from __future__ import annotations

import gzip
from pathlib import Path

import aiohttp
import brotli
import pytest
import zstandard

from tests.clients import assert_error, get, reply_of
from tests.conftest import GatewayFactory, Logs, RawUpstream, Upstream, route_to
from tests.gateway_process import GatewayProcess


def answer(status_line: bytes, *fields: bytes) -> bytes:
    return b"\r\n".join((status_line, *fields, b"Content-Length: 2", b"", b"ok"))


BAD_HEADS = {
    "/switching": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    "/status-600": answer(b"HTTP/1.1 600 Beyond"),
    "/space-before-colon": answer(b"HTTP/1.1 200 OK", b"Content-Length : 2"),
    "/invalid-utf8": answer(b"HTTP/1.1 200 OK", b"Link: <https://x.example/\xff>; rel=next"),
    "/control-byte": answer(b"HTTP/1.1 200 OK", b"X-Thing: a\x01b"),
    "/split-utf8": answer(b"HTTP/1.1 200 OK", b"X-A: \xc3", b"X-B: \xa9"),  # one character over two values
    "/control-in-reason": answer(b"HTTP/1.1 200 O\x01K"),
    "/latin1-reason": answer(b"HTTP/1.1 200 Caf\xe9"),
}


@pytest.mark.parametrize("path", sorted(BAD_HEADS))
async def test_an_invalid_response_head_is_502_never_relayed(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, logs: Logs, path: str
) -> None:
    raw_upstream.replies.update(BAD_HEADS)
    gw = await start_gateway(**route_to(raw_upstream))  # type: ignore[arg-type]
    reply = await get(gw.gateway.ports["listen"], path)
    assert_error(reply, 502, "upstream_bad_response")
    event = await logs.access(path)
    assert event["reason"] == "bad_response" and event["cause"]
    assert logs.named("unhandled_error") == []


@pytest.mark.parametrize("method", ["TRACE", "TRACK"])
async def test_trace_is_405_and_never_forwarded(
    start_gateway: GatewayFactory, upstream: Upstream, method: str
) -> None:
    gw = await start_gateway(**route_to(upstream))
    async with aiohttp.ClientSession() as client, client.request(method, gw.url + "/x") as resp:
        assert_error(await reply_of(resp), 405, "method_not_allowed")
    assert upstream.recorder.started == []


def bomb(coding: str, size: int) -> bytes:
    """`size` zero bytes compressed without ever holding them: a few KiB that inflate enormously."""
    block = b"\0" * 2**20
    if coding == "gzip":
        return gzip.compress(block * (size // 2**20), compresslevel=9)
    if coding == "br":
        encoder = brotli.Compressor(quality=5)
        return b"".join(encoder.process(block) for _ in range(size // 2**20)) + encoder.finish()
    compressor = zstandard.ZstdCompressor().compressobj()
    return b"".join(compressor.compress(block) for _ in range(size // 2**20)) + compressor.flush()


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
async def test_a_decompression_bomb_passes_through_unrewritten_with_bounded_memory(
    tmp_path: Path, raw_upstream: RawUpstream, coding: str
) -> None:
    body = bomb(coding, 512 * 2**20)
    raw_upstream.replies["/bomb"] = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: {coding}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    config = route_to(raw_upstream, rewrite={"body_paths": ["/**"]})  # type: ignore[arg-type]
    gw = GatewayProcess(config, tmp_path)
    try:
        baseline_kb = gw.peak_rss_kb()
        async with (
            aiohttp.ClientSession(auto_decompress=False) as client,
            client.get(gw.url + "/bomb") as resp,
        ):
            relayed = await resp.read()
            headers = resp.headers
        peak_kb = gw.peak_rss_kb()
    finally:
        assert gw.stop() == 0
    assert resp.status == 200
    assert relayed == body  # byte for byte, as the upstream sent it
    assert headers["Content-Encoding"] == coding and headers["Content-Length"] == str(len(body))
    assert (peak_kb - baseline_kb) < 96 * 1024  # far below the 512 MiB it would decode to
    [skipped] = gw.events("rewrite_skipped")
    assert skipped["reason"] == "inflate_ratio"
    [access] = gw.events("access")
    assert "rewrite:skipped_inflate_ratio" in access["decisions"]
