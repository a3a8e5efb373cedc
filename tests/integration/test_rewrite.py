"""Response URL rewriting through the real gateway: bodies (plain and compressed), headers, SSE, errors."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import brotli
import pytest
import zstandard
from aiohttp import web

from tests.conftest import GatewayFactory, _serve

APP = "http://app.braintrust.test"  # the app route's upstream, as it appears in bodies
DATA = "http://data.braintrust.test:8443"  # an advertised data-plane origin
PUBLIC = "https://public.example.com"


def body_text() -> bytes:
    doc = {
        "link": f"{APP}/app/org/p/proj",
        "escaped": "ESCAPED",
        "evil": f"{APP}.evil.com/x",
        "longer": f"{APP}x/y",
        "port": f"{APP}:9999/x",
        "org_info": [{"api_url": DATA, "proxy_url": f"{DATA}/proxy"}],
    }
    escaped = f"{APP}/x".replace("/", "\\/")  # JSON's optional escape of '/', as some encoders write it
    return json.dumps(doc).replace("ESCAPED", escaped).encode()


def encode(coding: str, data: bytes) -> bytes:
    if coding == "gzip":
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    if coding == "br":
        return brotli.compress(data)
    if coding == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def decode(coding: str, data: bytes) -> bytes:
    if coding == "gzip":
        return gzip.decompress(data)
    if coding == "deflate":
        return zlib.decompress(data)
    if coding == "br":
        return brotli.decompress(data)
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


@dataclass
class App:
    port: int
    gate: asyncio.Event


@pytest.fixture
async def app_upstream() -> AsyncIterator[App]:
    gate = asyncio.Event()

    async def json_body(request: web.Request) -> web.Response:
        coding = request.match_info["coding"]
        headers = {"ETag": '"v1"'} if coding == "identity" else {"Content-Encoding": coding}
        return web.Response(
            body=encode(coding, body_text()), content_type="application/json", headers=headers
        )

    async def redirect(_: web.Request) -> web.Response:
        return web.Response(
            status=302, headers={"Location": f"{APP}/app/next", "Link": f"<{DATA}/v1>; rel=x"}
        )

    async def png(_: web.Request) -> web.Response:
        return web.Response(body=b"\x89PNG" + APP.encode(), content_type="image/png")

    async def bad_gzip(_: web.Request) -> web.Response:
        return web.Response(
            body=b"\x1f\x8b\x08\x00garbage",
            content_type="application/json",
            headers={"Content-Encoding": "gzip"},
        )

    async def broken_later(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"})
        await response.prepare(request)
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
        await response.write(compressor.compress(b"x" * 300_000) + compressor.flush(zlib.Z_SYNC_FLUSH))
        await gate.wait()  # the test has seen the first bytes reach the client
        await response.write(b"\xff" * 64)  # then corrupt deflate data
        await response.write_eof()
        return response

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"data: {APP}/one\n\n".encode())
        await gate.wait()
        await response.write(f"data: {APP}/two\n\n".encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/json/{coding}", json_body)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/png", png)
    app.router.add_get("/bad-gzip", bad_gzip)
    app.router.add_get("/broken-later", broken_later)
    app.router.add_get("/sse", sse)
    runner, port = await _serve(app)
    yield App(port=port, gate=gate)
    gate.set()
    await runner.cleanup()


def config(port: int, **extra: object) -> dict[str, object]:
    return {
        "public_url": PUBLIC,
        "allowlist": ["app.braintrust.test", "data.braintrust.test"],
        "resolve": {"app.braintrust.test": "127.0.0.1", "data.braintrust.test": "127.0.0.1"},
        "routes": [
            {"name": "app", "prefix": "/", "upstream": f"{APP}:{port}"},
            {"name": "data", "prefix": "/data-plane", "upstream": DATA, "advertise": True},
        ],
        "rewrite": {"rules": [{"from": APP, "to": PUBLIC}], "body_paths": ["/**"]},  # every body, to test it
        **extra,
    }


def expected(gateway_url: str) -> dict[str, object]:
    doc = json.loads(body_text())
    doc["link"] = f"{PUBLIC}/app/org/p/proj"
    doc["escaped"] = f"{PUBLIC}/x"
    doc["org_info"] = [
        {"api_url": f"{gateway_url}/data-plane", "proxy_url": f"{gateway_url}/data-plane/proxy"}
    ]
    return doc


@pytest.mark.parametrize("coding", ["identity", "gzip", "deflate", "br", "zstd"])
async def test_json_body_rewritten_in_every_encoding(
    start_gateway: GatewayFactory, app_upstream: App, coding: str
) -> None:
    gw = await start_gateway(**config(app_upstream.port))
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(gw.url + f"/json/{coding}") as resp:
            raw = await resp.read()
    assert resp.status == 200
    assert resp.headers.get("Content-Encoding", "identity") == coding
    # a small body that came whole with its head is rewritten whole: sent with its new length
    assert resp.headers.get("Content-Length") == str(len(raw))
    assert json.loads(decode(coding, raw)) == expected(gw.url)
    if coding == "identity":
        assert resp.headers["ETag"] == 'W/"v1"'


async def test_advertise_url_and_trusted_forwarded_headers(
    start_gateway: GatewayFactory, app_upstream: App
) -> None:
    fixed = await start_gateway(**config(app_upstream.port, advertise_url="https://gw.corp.example"))
    trusting = await start_gateway(**config(app_upstream.port, trusted_proxies=["127.0.0.0/8"]))
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "edge.corp.example, inner"}
    async with aiohttp.ClientSession() as client:
        async with client.get(fixed.url + "/json/identity", headers=forwarded) as resp:
            first = await resp.json()
        async with client.get(trusting.url + "/json/identity", headers=forwarded) as resp:
            second = await resp.json()
        async with client.get(trusting.url + "/json/identity", headers={"Host": 'bad host"x'}) as resp:
            third = (resp.status, await resp.json())
    assert first["org_info"][0]["api_url"] == "https://gw.corp.example/data-plane"
    assert second["org_info"][0]["api_url"] == "https://edge.corp.example/data-plane"
    assert (third[0], third[1]["error"]["code"]) == (400, "bad_host")  # never the text of a rewritten URL


async def test_untrusted_forwarded_headers_are_ignored(
    start_gateway: GatewayFactory, app_upstream: App
) -> None:
    gw = await start_gateway(**config(app_upstream.port))
    async with aiohttp.ClientSession() as client:
        async with client.get(
            gw.url + "/json/identity", headers={"X-Forwarded-Host": "evil.example"}
        ) as resp:
            doc = await resp.json()
    assert doc["org_info"][0]["api_url"] == f"{gw.url}/data-plane"


async def test_location_and_link_headers_rewritten(start_gateway: GatewayFactory, app_upstream: App) -> None:
    gw = await start_gateway(**config(app_upstream.port))
    async with aiohttp.ClientSession() as client:
        async with client.get(gw.url + "/redirect", allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == f"{PUBLIC}/app/next"
            assert resp.headers["Link"] == f"<{gw.url}/data-plane/v1>; rel=x"


async def test_other_content_types_pass_byte_for_byte(
    start_gateway: GatewayFactory, app_upstream: App
) -> None:
    gw = await start_gateway(**config(app_upstream.port))
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/png") as resp:
        assert await resp.read() == b"\x89PNG" + APP.encode()
        assert resp.headers["Content-Length"] == str(4 + len(APP))


async def test_sse_events_rewritten_and_flushed(start_gateway: GatewayFactory, app_upstream: App) -> None:
    gw = await start_gateway(**config(app_upstream.port))
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/sse") as resp:
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
        assert first == f"data: {PUBLIC}/one\n\n".encode()  # while upstream still holds event two back
        app_upstream.gate.set()
        rest = await asyncio.wait_for(resp.content.read(), 10)
    assert rest == f"data: {PUBLIC}/two\n\n".encode()


async def test_malformed_gzip_before_any_byte_is_502(
    start_gateway: GatewayFactory, app_upstream: App
) -> None:
    gw = await start_gateway(**config(app_upstream.port))
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/bad-gzip") as resp:
        body = await resp.json()
    assert resp.status == 502
    assert body["error"]["code"] == "upstream_bad_encoding"


async def test_malformed_gzip_after_output_closes_the_connection(
    start_gateway: GatewayFactory, app_upstream: App
) -> None:
    gw = await start_gateway(**config(app_upstream.port))
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(gw.url + "/broken-later") as resp:
            assert resp.status == 200
            assert await asyncio.wait_for(resp.content.readany(), 10)
            app_upstream.gate.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(resp.read(), 10)


async def test_rewrite_disabled_passes_bodies_untouched(
    start_gateway: GatewayFactory, app_upstream: App
) -> None:
    gw = await start_gateway(**config(app_upstream.port, rewrite={"enabled": False}))
    async with aiohttp.ClientSession() as client, client.get(gw.url + "/json/identity") as resp:
        assert await resp.read() == body_text()
        assert resp.headers["ETag"] == '"v1"'
