"""Both ends of a connection for tests/integration/test_egress_lock.py, run inside a network namespace.

Standard library only, so any UID can run it from the source tree. Every outcome is one JSON line on
stdout, flushed at once:

    python tests/netns_peer.py listen NAME=HOST ...   a canary on port 0 of each HOST: `listening` lines,
                                                      then `accept` (at accept) and `request` lines; it
                                                      answers 200 `canary NAME`, and runs until killed
    python tests/netns_peer.py connect HOST PORT      `connected`, or the error's name and errno
    python tests/netns_peer.py get HOST PORT PATH     one HTTP/1.1 GET: `status` and `body`, or the error
    python tests/netns_peer.py connect-via HOST PORT TARGET   `CONNECT TARGET` to a proxy: its status line
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import socket
import sys
from typing import Any

TIMEOUT_S = 10  # a hang guard: a rejected connection fails at once, an accepted one answers at once


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def _answer(name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    emit(event="accept", name=name)
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
    except (TimeoutError, asyncio.IncompleteReadError, OSError):
        writer.close()
        return
    emit(event="request", name=name, line=head.split(b"\r\n", 1)[0].decode("latin-1"))
    body = f"canary {name}".encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.close()


async def listen(specs: list[str]) -> None:
    servers = []
    for spec in specs:
        name, host = spec.split("=", 1)
        server = await asyncio.start_server(functools.partial(_answer, name), host, 0)
        servers.append(server)
        emit(event="listening", name=name, host=host, port=server.sockets[0].getsockname()[1])
    await asyncio.Event().wait()


def _error(exc: OSError) -> None:
    emit(event="error", error=type(exc).__name__, errno=exc.errno)


def connect(host: str, port: int) -> None:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            emit(event="connected")
    except OSError as exc:
        _error(exc)


def get(host: str, port: int, path: str) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        emit(event="response", status=response.status, body=response.read().decode("latin-1"))
    except OSError as exc:
        _error(exc)
    finally:
        conn.close()


def connect_via(host: str, port: int, target: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            status = sock.makefile("rb").readline().decode("latin-1").strip()
            emit(event="response", status=int(status.split(" ")[1]), line=status)
    except OSError as exc:
        _error(exc)


def main(argv: list[str]) -> None:
    command, *rest = argv
    if command == "listen":
        asyncio.run(listen(rest))
    elif command == "connect":
        connect(rest[0], int(rest[1]))
    elif command == "get":
        get(rest[0], int(rest[1]), rest[2])
    elif command == "connect-via":
        connect_via(rest[0], int(rest[1]), rest[2])
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
