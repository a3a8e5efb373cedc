"""How a tunnel reaches its target: directly (resolve once, vet each address, connect) or by a CONNECT to
the corporate proxy in `upstream.proxy`. The target was judged by the chain already; this is the dialing.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from dataclasses import dataclass

from yarl import URL

from gateway.errors import Code, GatewayError, GatewayFailure, Reason
from gateway.policy.forward_proxy import ConnectTarget, ForwardProxyPolicy
from gateway.upstream import EgressResolver

CHUNK = 2**16


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
