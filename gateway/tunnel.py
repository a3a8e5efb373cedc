"""CONNECT tunnels: resolve once, connect to that address, then relay raw bytes both ways.

After the `200 Connection Established`, the client connection is taken from aiohttp's HTTP protocol the
way aiohttp's own WebSocket support does it (`set_parser` to collect bytes already read, then
`transport.set_protocol`), so half-close and back-pressure are plain asyncio streams. At the end the
transport is handed back to aiohttp's protocol before it closes, so aiohttp's bookkeeping sees the
connection go. This leans on aiohttp internals: the aiohttp minor version is pinned and tests cover it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from yarl import URL

from gateway.errors import Code, GatewayError, GatewayFailure, Reason
from gateway.policy.forward_proxy import ConnectTarget, ForwardProxyPolicy
from gateway.upstream import EgressResolver

ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
CHUNK = 2**16


@dataclass(slots=True)
class TunnelStats:
    """Every tunnel counter in one place, so metrics can export them later."""

    opened: int = 0
    active: int = 0
    refused: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    close_reasons: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class TunnelResult:
    address: str
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client
    reason: str = "closed"


class _Tail:
    """A stand-in payload parser that keeps bytes aiohttp read past the CONNECT head."""

    def __init__(self) -> None:
        self.data = bytearray()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data += data
        return False, b""

    def feed_eof(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class UpstreamProxy:
    """The corporate proxy (`upstream.proxy`) that tunnels are chained through, parsed once."""

    host: str
    port: int
    tls: bool
    authorization: str | None  # `Basic ...` from the URL's user:password, sent as Proxy-Authorization

    @classmethod
    def parse(cls, url: str | None) -> UpstreamProxy | None:
        if url is None:
            return None
        parsed = URL(url)
        assert parsed.host is not None and parsed.port is not None  # checked by the config model
        auth = None
        if parsed.user is not None:
            pair = f"{parsed.user}:{parsed.password or ''}".encode()
            auth = "Basic " + base64.b64encode(pair).decode()
        return cls(parsed.host, parsed.port, parsed.scheme == "https", auth)


def _unreachable(target: ConnectTarget, reason: Reason, text: str, cause: str) -> GatewayError:
    code = Code.UPSTREAM_TIMEOUT if reason is Reason.CONNECT_TIMEOUT else Code.UPSTREAM_UNREACHABLE
    return GatewayError(
        code,
        f"{text}: {target.host}",
        reason=reason,
        context=(("upstream", target.authority), ("cause", cause[:500])),
    )


@dataclass(frozen=True, slots=True)
class TunnelDialer:
    """How one generation opens tunnels: directly (resolve once, vet each address) or via `proxy`."""

    policy: ForwardProxyPolicy
    resolver: EgressResolver
    connect_timeout_s: float
    tls: ssl.SSLContext
    proxy: UpstreamProxy | None = None

    async def connect(self, target: ConnectTarget) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        """Open the upstream side of a tunnel (the target was judged already); raise GatewayFailure."""
        if self.proxy is not None:
            return await _through_proxy(target, self.proxy, self)
        return await _direct(target, self)


async def _direct(
    target: ConnectTarget, dialer: TunnelDialer
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """Resolve once, vet each address, connect to the first that answers."""
    connect_timeout_s = dialer.connect_timeout_s
    try:
        async with asyncio.timeout(connect_timeout_s):
            answers = await dialer.resolver.resolve(target.host, target.port, socket.AF_UNSPEC)
    except GatewayFailure:
        raise
    except (OSError, TimeoutError) as exc:
        error = _unreachable(target, Reason.DNS_FAILURE, "tunnel host did not resolve", repr(exc))
        raise GatewayFailure(error) from exc
    last = _unreachable(target, Reason.CONNECTION_FAILED, "could not connect to tunnel target", "no address")
    for answer in answers:
        address = answer["host"]
        refused = dialer.policy.check_address(target.host, address)
        if refused is not None:
            last = refused
            continue
        try:
            async with asyncio.timeout(connect_timeout_s):
                reader, writer = await asyncio.open_connection(address, target.port, limit=CHUNK)
        except TimeoutError:
            text = "tunnel target did not accept in time"
            last = _unreachable(target, Reason.CONNECT_TIMEOUT, text, f"timeout connecting to {address}")
            continue
        except OSError as exc:
            reason = (
                Reason.CONNECTION_REFUSED
                if isinstance(exc, ConnectionRefusedError)
                else Reason.CONNECTION_FAILED
            )
            last = _unreachable(target, reason, "could not connect to tunnel target", f"{address}: {exc}")
            continue
        return reader, writer, address
    raise GatewayFailure(last)


async def _through_proxy(
    target: ConnectTarget, proxy: UpstreamProxy, dialer: TunnelDialer
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """Open the tunnel with a CONNECT to the corporate proxy, which resolves and reaches the target.

    Private-address checks cannot apply here: the proxy, not the gateway, resolves the name.
    """
    connect_timeout_s = dialer.connect_timeout_s
    via = f"{proxy.host}:{proxy.port}"
    head = f"CONNECT {target.authority} HTTP/1.1\r\nHost: {target.authority}\r\n"
    if proxy.authorization:
        head += f"Proxy-Authorization: {proxy.authorization}\r\n"
    try:
        async with asyncio.timeout(connect_timeout_s):
            answers = await dialer.resolver.resolve(proxy.host, proxy.port, socket.AF_UNSPEC)
            reader, writer = await asyncio.open_connection(
                answers[0]["host"],
                proxy.port,
                ssl=dialer.tls if proxy.tls else None,
                server_hostname=proxy.host if proxy.tls else None,
                limit=CHUNK,
            )
    except TimeoutError as exc:
        error = _unreachable(target, Reason.CONNECT_TIMEOUT, "upstream proxy did not accept in time", via)
        raise GatewayFailure(error) from exc
    except OSError as exc:
        error = _unreachable(
            target, Reason.CONNECTION_FAILED, "could not connect to upstream proxy", f"{via}: {exc}"
        )
        raise GatewayFailure(error) from exc
    try:
        writer.write(head.encode("ascii") + b"\r\n")
        async with asyncio.timeout(connect_timeout_s):
            reply = await reader.readuntil(b"\r\n\r\n")
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        writer.close()
        error = _unreachable(
            target, Reason.PROXY_REFUSED, "upstream proxy did not open the tunnel", f"{via}: {exc!r}"
        )
        raise GatewayFailure(error) from exc
    status_line = reply.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].startswith("2"):
        writer.close()
        error = _unreachable(
            target, Reason.PROXY_REFUSED, "upstream proxy refused the tunnel", f"{via}: {status_line}"
        )
        raise GatewayFailure(error)
    return reader, writer, f"via {via}"


async def relay(
    request: web.BaseRequest,
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    result: TunnelResult,
    idle_timeout: float,
) -> None:
    """Answer 200, take the client connection over, and pump bytes until both sides are done or idle."""
    protocol: Any = request.protocol
    transport: Any = request.transport
    tail = _Tail()
    protocol.set_parser(tail)
    transport.write(ESTABLISHED)
    loop = asyncio.get_running_loop()
    client_reader = asyncio.StreamReader(limit=CHUNK)
    stream_protocol = asyncio.StreamReaderProtocol(client_reader)
    transport.set_protocol(stream_protocol)
    stream_protocol.connection_made(transport)
    if tail.data:
        client_reader.feed_data(bytes(tail.data))
    if getattr(protocol, "client_eof", False):
        client_reader.feed_eof()  # the client's FIN came before the 200: pass it on after its bytes
    if not transport.is_reading():
        transport.resume_reading()
    client_writer = asyncio.StreamWriter(transport, stream_protocol, client_reader, loop)
    up_reader, up_writer = upstream
    activity = [loop.time()]
    try:
        result.reason = await _pump_both(
            client_reader=client_reader,
            client_writer=client_writer,
            up_reader=up_reader,
            up_writer=up_writer,
            result=result,
            activity=activity,
            idle_timeout=idle_timeout,
        )
    finally:
        up_writer.close()
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(up_writer.wait_closed(), 1)
        finally:
            # Last, with no await after it: aiohttp's connection_lost cancels this handler.
            transport.set_protocol(protocol)  # aiohttp must see connection_lost to forget this connection
            transport.close()


async def _pump_both(
    *,
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
    result: TunnelResult,
    activity: list[float],
    idle_timeout: float,
) -> str:
    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
        while data := await src.read(CHUNK):
            activity[0] = asyncio.get_running_loop().time()
            if up:
                result.bytes_up += len(data)
            else:
                result.bytes_down += len(data)
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()  # half-close: pass the FIN on, keep the other direction open

    tasks = {
        asyncio.ensure_future(pump(client_reader, up_writer, True)),
        asyncio.ensure_future(pump(up_reader, client_writer, False)),
    }
    reason = "closed"
    try:
        while tasks:
            deadline = activity[0] + idle_timeout
            wait = max(0.0, deadline - asyncio.get_running_loop().time())
            done, tasks = await asyncio.wait(tasks, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if not done and asyncio.get_running_loop().time() >= activity[0] + idle_timeout:
                return "idle_timeout"
            for task in done:
                if task.exception() is not None:
                    return "reset"
        return reason
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
