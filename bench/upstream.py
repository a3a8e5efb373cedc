"""The Python upstream of the benchmark (a subprocess): `python bench/upstream.py PORT`.

GET /stream     1 GiB of application/octet-stream in 64 KiB chunks (Content-Length set)
GET /big.json   ~20 MB of JSON (decoded) sent gzip-encoded, with its own URL in every record
PUT /upload     reads the whole body as fast as it comes and discards it; answers with its byte count

The JSON body is built and compressed before the port opens, so a caller that waits for the port waits for it.
"""

from __future__ import annotations

import gzip
import json
import os
import sys

from aiohttp import web

STREAM_BYTES = 2**30
CHUNK = 64 * 2**10
JSON_BYTES = 20 * 10**6


def big_json(port: int) -> bytes:
    """Records with a random id (gzip stays under the gateway's 100x inflate bound) and the upstream URL."""
    records: list[bytes] = []
    size = 0
    i = 0
    while size < JSON_BYTES:
        ident = os.urandom(8).hex()
        record = json.dumps({"id": ident, "url": f"http://127.0.0.1:{port}/v1/objects/{ident}", "n": i})
        records.append(record.encode())
        size += len(records[-1]) + 1
        i += 1
    return b'{"rows": [' + b",".join(records) + b"]}"


def app(port: int) -> web.Application:
    body = gzip.compress(big_json(port), compresslevel=6)
    chunk = b"x" * CHUNK

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = STREAM_BYTES
        await response.prepare(request)
        for _ in range(STREAM_BYTES // CHUNK):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def json_gzip(request: web.Request) -> web.Response:
        return web.Response(
            body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )

    async def sink(request: web.Request) -> web.Response:
        size = 0
        while chunk := await request.content.readany():
            size += len(chunk)
        return web.Response(text=str(size))

    application = web.Application(client_max_size=0)
    application.router.add_get("/stream", stream)
    application.router.add_get("/big.json", json_gzip)
    application.router.add_put("/upload", sink)
    return application


if __name__ == "__main__":
    port = int(sys.argv[1])
    web.run_app(app(port), host="127.0.0.1", port=port, print=None, access_log=None)
