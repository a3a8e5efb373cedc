"""The ceiling of the stack (a subprocess): `python bench/bare_proxy.py PORT UPSTREAM_PORT`.

The least an aiohttp server can do to forward a request: the same uvloop, the same server, the same C
response parser and keep-alive connections the gateway uses, and nothing else (no policies, no header
rules, no limits, no logging). What it reaches in the same run is the most the gateway could reach on this
stack and machine; the gateway's ratio to it is what its policies cost.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web
from aiohttp.client_proto import ResponseHandler


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    idle: list[ResponseHandler] = []

    async def connection() -> ResponseHandler:
        while idle:
            protocol = idle.pop()
            if protocol.is_connected() and not protocol.should_close:
                return protocol
            protocol.close()
        _, protocol = await loop.create_connection(lambda: ResponseHandler(loop), "127.0.0.1", upstream_port)
        protocol.set_response_params(auto_decompress=False, read_bufsize=2**16)
        return protocol

    async def forward(request: web.BaseRequest) -> web.Response:
        protocol = await connection()
        assert protocol.transport is not None
        auth = request.headers.get("Authorization", "")
        line = f"{request.method} {request.raw_path} HTTP/1.1\r\n"
        head = f"{line}Host: 127.0.0.1\r\nAuthorization: {auth}\r\n\r\n"
        protocol.transport.write(head.encode())
        message, content = await protocol.read()
        body = await content.read()
        if not protocol.should_close:
            idle.append(protocol)
        content_type = message.headers.get("Content-Type", "application/octet-stream")
        return web.Response(body=body, status=message.code, headers={"Content-Type": content_type})

    runner = web.ServerRunner(web.Server(forward), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
