"""The egress allow-list: the only hosts any outgoing connection may reach.

Entry grammar (one string each):
    entry    = host [ ":" port ]
    host     = "*." domain        ; any name strictly below `domain`, on a label boundary
             | domain             ; exactly this name
             | ipv4 | "[" ipv6 "]"  ; exactly this address (IP literals match only when listed literally)
Names are compared in canonical form (lowercase, IDNA/punycode, one trailing dot removed), so
`WWW.Braintrust.dev.` and `www.braintrust.dev` are one host, and `evilbraintrust.dev` never matches
`*.braintrust.dev`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from gateway.errors import Code, GatewayError, Reason

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def _canonical_ip(host: str) -> str | None:
    """The compressed text of an IP literal (`[::1]` and `::1` alike), or None for a name."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if "%" in text:  # an IPv6 zone id names a local interface, never a remote destination
        return None
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        return None


def canonical_host(host: str | None) -> str | None:
    """Canonical form of a host for matching, or None when it is not a plain, parseable host.

    Anything with userinfo, a zone id (`%`), whitespace or characters DNS cannot carry is refused here,
    so an odd encoding can never be read one way by the check and another way by the resolver.
    """
    if not host or len(host) > 255:
        return None
    ip = _canonical_ip(host)
    if ip is not None:
        return ip
    if any(ch in host for ch in "%@/\\?#[] \t\r\n:"):
        return None
    name = host[:-1] if host.endswith(".") else host
    try:
        name = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return None
    return name


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """One parsed allow-list entry; `port` None means any port."""

    host: str
    wildcard: bool
    port: int | None

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


def parse_entry(text: str) -> AllowEntry:
    """Parse one entry (see the module grammar); raise ValueError naming what is wrong."""
    raw = text.strip()
    port: int | None = None
    host_part = raw
    if raw.startswith("["):
        end = raw.find("]")
        rest = raw[end + 1 :] if end != -1 else ""
        host_part = raw[: end + 1] if end != -1 else raw
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r} is not host[:port]")
            port = parse_port(rest[1:], text)
    elif raw.count(":") == 1:
        host_part, port_text = raw.split(":")
        port = parse_port(port_text, text)
    wildcard = host_part.startswith("*.")
    if wildcard:
        host_part = host_part[2:]
    elif "*" in host_part:
        raise ValueError(f"{text!r}: a wildcard must be a whole leading label, as in *.example.com")
    canonical = canonical_host(host_part)
    if canonical is None:
        raise ValueError(f"{text!r} is not a valid host name or IP address")
    if wildcard and (_canonical_ip(canonical) is not None or canonical.replace(".", "").isdigit()):
        raise ValueError(f"{text!r}: a wildcard cannot cover an IP address")
    if wildcard and "." not in canonical:
        raise ValueError(f"{text!r}: a wildcard must sit above a domain with at least two labels")
    return AllowEntry(host=canonical, wildcard=wildcard, port=port)


def parse_port(text: str, entry: str) -> int:
    """A port from 1 to 65535, or ValueError naming `entry`, the value it came from."""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValueError(f"{entry!r}: port must be a number from 1 to 65535")
    return int(text)


class Allowlist:
    """Decides whether a (host, port) may be connected to. Built once from config; pure and cheap."""

    __slots__ = ("_exact", "_rules")

    def __init__(self, entries: tuple[AllowEntry, ...]) -> None:
        self._rules = entries
        self._exact = frozenset(e.host for e in entries if not e.wildcard and e.port is None)

    @classmethod
    def parse(cls, texts: list[str] | tuple[str, ...]) -> Allowlist:
        return cls(tuple(parse_entry(t) for t in texts))

    @property
    def entries(self) -> tuple[AllowEntry, ...]:
        return self._rules

    def allows(self, host: str | None, port: int) -> bool:
        canonical = canonical_host(host)
        if canonical is None:
            return False
        if canonical in self._exact:
            return True
        literal = _canonical_ip(canonical) is not None  # IP literals match only entries naming them
        return any(rule.matches(canonical, port) for rule in self._rules if not (literal and rule.wildcard))

    def check(self, host: str | None, port: int) -> GatewayError | None:
        """None when allowed; otherwise the `egress_denied` error naming the host."""
        if self.allows(host, port):
            return None
        shown = (host or "")[:255]
        return GatewayError(
            Code.EGRESS_DENIED,
            f"egress to {shown!r} port {port} is not on the allow-list",
            reason=Reason.HOST_NOT_ALLOWED,
        )
