"""The forwarding core's client side: one pooled aiohttp session whose every connection is allow-listed.

The allow-list is enforced where connections are made (the connector and its resolver), not only in the
request handler, so no path, header, redirect or retry inside aiohttp can reach a host the config did not
name. Exceptions from aiohttp become `GatewayError` values through one table, here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.resolver import DefaultResolver

from gateway.aiohttp_internals import CheckedConnector
from gateway.config.model import GatewayConfig
from gateway.errors import Code, GatewayError, GatewayFailure, Reason
from gateway.logs import loggable_text
from gateway.policy.allowlist import Allowlist
from gateway.policy.forward_proxy import not_public


class ConnectTimeout(TimeoutError):
    """No upstream connection could be opened within `upstream.connect_timeout_s`."""


class WriteTimeout(TimeoutError):
    """The upstream took no request bytes for `upstream.write_timeout_s`."""


class NameNotResolved(OSError):
    """The upstream's name did not resolve."""


# The client must not invent request headers the SDK did not send (aiohttp adds these by default).
SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


class EgressGuard:
    """The live allow-list seen by the connector and resolver; `allowlist` is swapped whole on reload.

    In report mode (`report`, the top-level `mode`) a destination off the allow-list is let through, as the
    chain let it, but to public addresses only: report mode never opens a way to private, loopback,
    link-local or reserved addresses the allow-list does not name (with `upstream.proxy` the proxy
    resolves names, so only IP literals can be judged).
    """

    __slots__ = ("allowlist", "extra_hosts", "report")

    def __init__(
        self, allowlist: Allowlist, extra_hosts: frozenset[str] = frozenset(), report: bool = False
    ) -> None:
        self.allowlist = allowlist
        self.extra_hosts = extra_hosts  # e.g. the corporate proxy: resolvable, but never a destination
        self.report = report

    def require(self, host: str | None, port: int) -> bool:
        """Raise for a destination the allow-list refuses; True when it allows it, False when only report
        mode lets it go (then `public_only` vets its addresses)."""
        error = self.allowlist.check(host, port)
        if error is None:
            return True
        if not self.report or host is None:
            raise GatewayFailure(error)
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False  # a name: its addresses are vetted where it resolves
        self.public_only(host, port, [literal.compressed])
        return False

    def public_only(self, host: str, port: int, addresses: list[str]) -> list[str]:
        """The addresses report mode may reach for an off-list `host`: public, or allow-listed literally."""
        admitted = [
            a for a in addresses if ipaddress.ip_address(a).is_global or self.allowlist.allows(a, port)
        ]
        if not admitted:
            raise GatewayFailure(not_public(host, addresses[0] if addresses else ""))
        return admitted


class EgressResolver(AbstractResolver):
    """Resolves only allow-listed names (plus the configured upstream proxy) and honours static entries."""

    def __init__(self, guard: EgressGuard, static: Mapping[str, str] | None = None) -> None:
        self._guard = guard
        self._static = dict(static or {})
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        listed = host.lower() in self._guard.extra_hosts or self._guard.require(host, port)
        address = self._static.get(host.lower().rstrip("."))
        if address is not None:
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            answers = [ResolveResult(hostname=host, host=address, port=port, family=fam, proto=0, flags=0)]
        else:
            answers = await self._inner.resolve(host, port, family)
        if listed:
            return answers
        admitted = self._guard.public_only(host, port, [answer["host"] for answer in answers])
        return [answer for answer in answers if answer["host"] in admitted]

    async def close(self) -> None:
        await self._inner.close()


class EgressConnector(CheckedConnector):
    """A TCPConnector that re-checks the final URL's host and port at the moment a connection is made."""

    def __init__(self, guard: EgressGuard, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._guard = guard

    def admit(self, host: str | None, port: int) -> None:
        self._guard.require(host, port)


def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """System CAs plus the operator's bundle (for corporate TLS inspection); verification always on."""
    context = ssl.create_default_context()
    if ca_bundle:
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except ssl.SSLError as exc:
            raise ValueError(f"{ca_bundle!r} holds no usable PEM CA certificate ({exc.reason})") from None
        except OSError as exc:
            raise ValueError(f"cannot read {ca_bundle!r}: {exc.strerror or exc}") from None
    return context


def build_session(
    config: GatewayConfig, guard: EgressGuard, resolver: EgressResolver, tls: ssl.SSLContext
) -> aiohttp.ClientSession:
    """The one client session: pooled keep-alive, no redirects, no cookies, no decompression, no env proxy."""
    up = config.upstream
    connector = EgressConnector(
        guard,
        ssl=tls,
        resolver=resolver,
        limit=config.limits.max_connections,
        limit_per_host=0,
        ttl_dns_cache=30,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
        skip_auto_headers=SKIP_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=up.connect_timeout_s,
            sock_connect=up.connect_timeout_s,
            sock_read=up.read_timeout_s,
        ),
        max_line_size=config.limits.max_header_kb * 1024,
        max_field_size=config.limits.max_header_kb * 1024,
        read_bufsize=2**16,
    )


def client_error(exc: BaseException, upstream: str) -> GatewayError:
    """The one table from aiohttp/OS exceptions to gateway errors.

    The client's message names only `upstream` (the host it asked for); the cause and the exception text,
    which may hold a resolved address, go to the log through `reason` and `context`. The text may quote
    the request's URL (aiohttp's response and proxy errors do), a signed one on a relay transfer: it is
    `loggable_text`.
    """
    if isinstance(exc, GatewayFailure):
        return exc.error
    code, reason, text = _classify(exc)
    if code is Code.INTERNAL:
        text = "internal error while forwarding"
    return GatewayError(
        code,
        f"{text}: {upstream}",
        reason=reason,
        context=(("upstream", upstream), ("cause", loggable_text(f"{type(exc).__name__}: {exc}")[:500])),
    )


def _classify(exc: BaseException) -> tuple[Code, Reason | None, str]:
    if isinstance(exc, aiohttp.ConnectionTimeoutError | ConnectTimeout):
        return Code.UPSTREAM_TIMEOUT, Reason.CONNECT_TIMEOUT, "upstream did not accept a connection in time"
    if isinstance(exc, WriteTimeout):
        return Code.UPSTREAM_TIMEOUT, Reason.WRITE_TIMEOUT, "upstream stopped taking the request body"
    if isinstance(exc, asyncio.TimeoutError):  # includes aiohttp's SocketTimeoutError (read)
        return Code.UPSTREAM_TIMEOUT, Reason.READ_TIMEOUT, "upstream did not answer in time"
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return Code.UPSTREAM_UNREACHABLE, Reason.PROXY_REFUSED, "the upstream proxy refused the connection"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return Code.UPSTREAM_UNREACHABLE, Reason.TLS_VERIFICATION, "upstream TLS certificate was not trusted"
    if isinstance(exc, aiohttp.ClientConnectorDNSError | socket.gaierror | NameNotResolved):
        return Code.UPSTREAM_UNREACHABLE, Reason.DNS_FAILURE, "upstream host name did not resolve"
    refused = isinstance(exc, ConnectionRefusedError) or (
        isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, ConnectionRefusedError)
    )
    if refused:
        return Code.UPSTREAM_UNREACHABLE, Reason.CONNECTION_REFUSED, "upstream refused the connection"
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError | HttpProcessingError):
        return Code.UPSTREAM_BAD_RESPONSE, Reason.BAD_RESPONSE, "upstream sent a malformed response"
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        return Code.UPSTREAM_UNREACHABLE, Reason.CONNECTION_FAILED, "connection to upstream failed"
    return Code.INTERNAL, None, ""
