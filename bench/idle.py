"""Figure 9: what an idle connection costs a proxy in memory (issue 23 item 5).

A fresh proxy per round is warmed up, its RSS read once it has settled, then 5,000 keep-alive client
connections each send one request, read the whole response and stay open; the settled RSS growth divided
by 5,000 is the cost of one idle client connection. On the gateway, 1,000 CONNECT tunnels to a local
accept-and-echo target follow (each sees its 200 and one byte echoed end to end, then stays idle).

RSS is user space only (kernel socket buffers are not in it). The clients and the tunnel target run in this
process, on asyncio; it needs some 7,000 descriptors, so its soft RLIMIT_NOFILE is raised (the proxy, a
child, inherits it).
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from figures import rss_kb
from peers import TOKEN, gateway_config

CLIENTS = 5_000
TUNNELS = 1_000
WARM_UP = 200  # connections of one request each, closed before the first reading
CONCURRENCY = 100  # connections being opened at once
DESCRIPTORS = 10_000  # clients, tunnels and their target's side (7,000), with room to spare
MAX_CLIENT_CONNECTIONS = 8_192  # the bench gateway's limit: above the 6,000 held
SETTLE_S = 5  # at most this long for RSS to stop moving
# What an SDK's request adds to the bench's three fields: aiohttp keeps the last head of every idle
# connection (until its next request), so the cost of one grows with it.
SDK_FIELDS = (
    "User-Agent: braintrust-python/0.2.0 python-requests/2.32.3\r\n"
    "Accept-Encoding: gzip, deflate, zstd\r\n"
    "Accept: */*\r\n"
    "Connection: keep-alive\r\n"
    "Content-Type: application/json\r\n"
    "X-Bt-Org-Name: example-org\r\n"
    "X-Bt-Project-Id: b5d0a0c2-5a1b-4c8e-9d3e-0123456789ab\r\n"
    "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
)
T = TypeVar("T")
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True)
class IdleRound:
    """One proxy's RSS in KB: settled after warm-up, with the idle clients, and with the tunnels too."""

    before_kb: int
    clients_kb: int
    tunnels_kb: int | None  # None: no tunnels (the bare proxy)

    @property
    def per_client_kb(self) -> float:
        return (self.clients_kb - self.before_kb) / CLIENTS

    @property
    def per_tunnel_kb(self) -> float | None:
        return None if self.tunnels_kb is None else (self.tunnels_kb - self.clients_kb) / TUNNELS


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to what the run needs (the hard limit is the ceiling); fail early if it can't."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < DESCRIPTORS:
        raise RuntimeError(
            f"RLIMIT_NOFILE hard limit {hard} < {DESCRIPTORS} descriptors the idle figure needs"
        )
    if soft != resource.RLIM_INFINITY and soft < DESCRIPTORS:
        resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTORS, hard))


def settled_rss(pid: int) -> int:
    """RSS (KB) once two readings 0.25 s apart differ by <= 64 KB, or the last one after SETTLE_S."""
    deadline = time.monotonic() + SETTLE_S
    last = rss_kb(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = rss_kb(pid)
        if abs(now - last) <= 64:
            return now
        last = now
    return last


async def bounded(count: int, make: Callable[[], Awaitable[T]]) -> list[T]:
    """`count` results of `make()`, at most CONCURRENCY at a time."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one() -> T:
        async with gate:
            return await make()

    return await asyncio.gather(*(one() for _ in range(count)))


async def read_head(reader: asyncio.StreamReader) -> tuple[int, int]:
    """Status and Content-Length (0 when absent) of one response head."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status = int(head.split(" ", 2)[1])
    length = 0
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, length


async def one_request(port: int, *, close: bool = False, fields: str = "") -> Stream:
    """A connection that has sent one GET /v1/bench (with `fields` in its head) and read its whole 200
    response: kept alive, or with `close` asked to close and read to its end (the proxy has let it go)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    fields += "Connection: close\r\n" if close else ""
    head = f"GET /v1/bench HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {TOKEN}\r\n{fields}\r\n"
    writer.write(head.encode())
    status, length = await read_head(reader)
    await reader.readexactly(length)
    if status != 200:
        raise RuntimeError(f"idle client: GET /v1/bench answered {status}")
    if close and await reader.read(1):
        raise RuntimeError("idle client: bytes after the response to a Connection: close request")
    return reader, writer


async def warm_up(port: int) -> None:
    """WARM_UP requests on connections the proxy closes, each read to its end before this returns."""
    for _, writer in await bounded(WARM_UP, lambda: one_request(port, close=True)):
        writer.close()


async def one_tunnel(port: int, target_port: int) -> Stream:
    """A CONNECT tunnel to the target, answered 200 and proven open by one byte echoed through it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    target = f"127.0.0.1:{target_port}"
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    status, _ = await read_head(reader)
    if status != 200:
        raise RuntimeError(f"idle tunnel: CONNECT answered {status}")
    writer.write(b"x")
    if await reader.readexactly(1) != b"x":
        raise RuntimeError("idle tunnel: the byte did not come back")
    return reader, writer


def still_open(streams: Iterable[Stream]) -> None:
    """Fail unless every connection is still open: a proxy that closed some has not kept them idle."""
    closed = sum(reader.at_eof() or writer.is_closing() for reader, writer in streams)
    if closed:
        raise RuntimeError(f"{closed} idle connections were closed by the proxy before the reading")


class EchoTarget(asyncio.Protocol):
    """The tunnels' target: sends back what it gets and keeps the connection open."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def measure(pid: int, port: int, target_port: int | None, fields: str = "") -> IdleRound:
    """One round against the proxy `pid` on `port`, the clients' requests carrying `fields`; with tunnels
    to an echo target on `target_port` (started here; the proxy must allow it) unless None."""
    streams: list[Stream] = []
    loop = asyncio.get_running_loop()
    target = None
    if target_port is not None:
        target = await loop.create_server(EchoTarget, "127.0.0.1", target_port, backlog=1024)
    try:
        await warm_up(port)
        before = await loop.run_in_executor(None, settled_rss, pid)
        streams += await bounded(CLIENTS, lambda: one_request(port, fields=fields))
        still_open(streams)
        clients = await loop.run_in_executor(None, settled_rss, pid)
        tunnels = None
        if target_port is not None:
            streams += await bounded(TUNNELS, lambda: one_tunnel(port, target_port))
            still_open(streams)
            tunnels = await loop.run_in_executor(None, settled_rss, pid)
        still_open(streams)  # none went while the readings settled
        return IdleRound(before, clients, tunnels)
    finally:
        for _, writer in streams:
            writer.close()
        if target is not None:
            target.close()


def idle_round(pid: int, port: int, target_port: int | None = None, fields: str = "") -> IdleRound:
    return asyncio.run(measure(pid, port, target_port, fields))


def idle_gateway_config(port: int, upstream_port: int, target_port: int) -> dict[str, Any]:
    """The default-policy bench gateway with CONNECT allowed to the echo target, new tunnels unthrottled,
    and `limits.max_client_connections` raised above the 6,000 connections held (default 4,096)."""
    config = gateway_config(port, upstream_port)
    config["allowlist"] = [*config["allowlist"], f"127.0.0.1:{target_port}"]
    config["limits"] = {"max_client_connections": MAX_CLIENT_CONNECTIONS}
    config["forward_proxy"] = {
        "enabled": True,
        "connect_ports": [target_port],
        "rate_limit": {"max_tunnels": 10 * TUNNELS, "window_minutes": 1},
    }
    return config
