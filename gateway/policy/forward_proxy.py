"""Forward-proxy decisions: which CONNECT targets and absolute-form URLs may leave, decided without I/O.

CONNECT target grammar (RFC 9110 9.3.6 authority-form):
    target = host ":" port
    host   = reg-name | IPv4address | "[" IPv6address "]"
    port   = 1*5DIGIT, 1..65535
Anything else (no port, userinfo, a path, a bare IPv6 address) is a malformed target: 400.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gateway.errors import Code, GatewayError, Reason
from gateway.policy.allowlist import Allowlist, canonical_host


@dataclass(frozen=True, slots=True)
class ConnectTarget:
    host: str  # canonical: lowercase, IDNA, IPv6 without brackets
    port: int

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _bad(target: str) -> GatewayError:
    return GatewayError(
        Code.BAD_CONNECT_TARGET,
        f"CONNECT target {target[:200]!r} is not host:port",
        reason=Reason.MALFORMED_TARGET,
    )


def parse_connect_target(target: str) -> ConnectTarget | GatewayError:
    """Parse an authority-form target strictly (see the module grammar)."""
    if not target or any(ch in target for ch in "@/?#\\ \t%"):
        return _bad(target)
    if target.startswith("["):
        end = target.find("]")
        host, rest = target[1:end], target[end + 1 :]
        if end == -1 or not rest.startswith(":"):
            return _bad(target)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return _bad(target)
        port_text = rest[1:]
    else:
        host, sep, port_text = target.rpartition(":")
        if not sep or not host or ":" in host:
            return _bad(target)
    digits = port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
    if not digits or not 0 < int(port_text) < 65536:
        return _bad(target)
    canonical = canonical_host(host)
    if canonical is None:
        return _bad(target)
    return ConnectTarget(canonical, int(port_text))


def not_public(host: str, address: str) -> GatewayError:
    """The refusal of a non-public address; the client learns the host, the log the address."""
    return GatewayError(
        Code.EGRESS_DENIED,
        f"egress to {host!r} is not allowed: it does not resolve to a public address",
        reason=Reason.PRIVATE_ADDRESS,
        context=(("upstream_address", address),),
    )


class ForwardProxyPolicy:
    """Allow-list + port + resolved-address rules for tunnels; built once from config."""

    __slots__ = ("_allowlist", "_deny_private", "_literals", "_ports")

    def __init__(self, allowlist: Allowlist, connect_ports: tuple[int, ...], deny_private: bool) -> None:
        self._allowlist = allowlist
        self._ports = frozenset(connect_ports)
        self._deny_private = deny_private
        self._literals = frozenset(e.host for e in allowlist.entries if not e.wildcard)

    @property
    def checks_addresses(self) -> bool:
        """Whether `check_address` refuses anything (`deny_private_addresses`)."""
        return self._deny_private

    def check_target(self, target: ConnectTarget) -> GatewayError | None:
        denied = self._allowlist.check(target.host, target.port)
        if denied is not None:
            return denied
        if target.port not in self._ports:
            return GatewayError(
                Code.EGRESS_DENIED,
                f"CONNECT to port {target.port} is not allowed",
                reason=Reason.PORT_NOT_ALLOWED,
            )
        return None

    def check_address(self, host: str, address: str) -> GatewayError | None:
        """Refuse loopback/private/link-local answers unless that literal address is itself allow-listed.

        The client learns that `host` was refused, never the address it resolved to (the log has it).
        """
        if not self._deny_private:
            return None
        ip = ipaddress.ip_address(address)
        if not ip.is_global and ip.compressed not in self._literals:
            return not_public(host, ip.compressed)
        return None
