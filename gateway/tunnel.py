"""CONNECT tunnels in one unit: dial the judged target, answer 200, relay bytes, count, log one event.

After the `200 Connection Established`, the client connection is taken from aiohttp's HTTP protocol the
way aiohttp's own WebSocket support does it (`divert`, its `set_parser`, to collect bytes already read,
then `transport.set_protocol`), so half-close and back-pressure are plain asyncio streams. At the end the
transport is handed back to aiohttp's protocol before it closes, so aiohttp's bookkeeping sees the
connection go. The aiohttp parts of this live in gateway/aiohttp_internals.py, checked at start-up.

The client connection may be TLS (`listen.tls`: an https:// proxy, CONNECT inside TLS). asyncio's (and
uvloop's) SSL transport is taken over the same way, but TLS has no half-close: the client's close_notify
closes the whole connection, so what the upstream still sends after it has nowhere to go. That is the
ordinary end of such a tunnel (reason `closed`), not a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from aiohttp import web

from gateway.dial import TunnelDialer
from gateway.errors import GatewayError, GatewayFailure
from gateway.exchange import Exchange
from gateway.logs import get_logger
from gateway.metrics import Metrics

ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
CHUNK = 2**16
log = get_logger("gateway.tunnel")


class CloseReason(StrEnum):
    """Why a tunnel ended: the `reason` of its log event and of `bt_gateway_tunnels_total`."""

    CLOSED = "closed"  # both sides finished
    IDLE_TIMEOUT = "idle_timeout"  # no byte either way for forward_proxy.idle_timeout_s
    RESET = "reset"  # one side failed (reset, broken pipe)
    CANCELLED = "cancelled"  # the client left, or the gateway shut down


@dataclass(slots=True)
class TunnelStats:
    """Every tunnel counter of the process, in one place."""

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
    reason: CloseReason = CloseReason.CLOSED


class Tunnels:
    """Runs every tunnel of the process: dial, relay, counters, metrics, one `tunnel` log event each."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.stats = TunnelStats()
        self._metrics = metrics

    def refused(self) -> None:
        self.stats.refused += 1

    async def run(
        self, request: web.BaseRequest, exchange: Exchange, dialer: TunnelDialer, idle_timeout_s: float
    ) -> GatewayError | None:
        """Open and relay the tunnel until it ends; the error when the target could not be reached."""
        target = exchange.connect
        assert target is not None  # judged by the CONNECT chain
        try:
            reader, writer, address = await dialer.connect(target)
        except GatewayFailure as exc:
            self.refused()
            return exc.error
        exchange.status = 200
        exchange.decisions.append("tunnel:open")
        result = TunnelResult(address=address)
        stats, metrics = self.stats, self._metrics
        stats.opened += 1
        stats.active += 1
        if metrics is not None:
            metrics.tunnels_active.inc()
        started = time.perf_counter()
        try:
            await relay(request, (reader, writer), result, idle_timeout_s)
        except asyncio.CancelledError:
            result.reason = CloseReason.CANCELLED
            raise
        finally:
            stats.active -= 1
            stats.bytes_up += result.bytes_up
            stats.bytes_down += result.bytes_down
            stats.close_reasons[result.reason] = stats.close_reasons.get(result.reason, 0) + 1
            if metrics is not None:
                metrics.tunnels_active.dec()
                metrics.tunnels.labels(reason=str(result.reason)).inc()
            exchange.bytes_in, exchange.bytes_out = result.bytes_up, result.bytes_down
            log.info(
                "tunnel",
                client=exchange.client_ip,
                target=target.authority,
                address=result.address,
                bytes_up=result.bytes_up,
                bytes_down=result.bytes_down,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
                reason=str(result.reason),
                request_id=exchange.request_id,
            )
        return None


class _Tail:
    """A stand-in payload parser that keeps bytes aiohttp read past the CONNECT head."""

    def __init__(self) -> None:
        self.data = bytearray()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data += data
        return False, b""

    def feed_eof(self) -> None:
        pass


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
    protocol.divert(tail)
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
    client_tls = transport.get_extra_info("sslcontext") is not None
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
            client_tls=client_tls,
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
    client_tls: bool,
) -> CloseReason:
    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
        while data := await src.read(CHUNK):
            activity[0] = asyncio.get_running_loop().time()
            if up:
                result.bytes_up += len(data)
            else:
                result.bytes_down += len(data)
            try:
                dst.write(data)
                await dst.drain()
            except ConnectionError:
                if up or not (client_tls and client_reader.at_eof()):
                    raise
                return  # the TLS client closed (no half-close in TLS): the tunnel is over
        if dst.can_write_eof():
            dst.write_eof()  # half-close: pass the FIN on, keep the other direction open

    tasks = {
        asyncio.ensure_future(pump(client_reader, up_writer, True)),
        asyncio.ensure_future(pump(up_reader, client_writer, False)),
    }
    reason = CloseReason.CLOSED
    try:
        while tasks:
            deadline = activity[0] + idle_timeout
            wait = max(0.0, deadline - asyncio.get_running_loop().time())
            done, tasks = await asyncio.wait(tasks, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if not done and asyncio.get_running_loop().time() >= activity[0] + idle_timeout:
                return CloseReason.IDLE_TIMEOUT
            for task in done:
                if task.exception() is not None:
                    return CloseReason.RESET
        return reason
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
