"""The gateway's own URL as the client reached it, for advertising data-plane routes back through it.

`advertise_url` wins when set. Otherwise `X-Forwarded-Proto`/`-Host` count only when the peer is a
trusted proxy (their first, client-facing value); else the request's own scheme and `Host`. A `Host`
that is not a plain `host[:port]` is ignored, so a client cannot inject text into rewritten bodies.
"""

from __future__ import annotations

import functools
import ipaddress
import re

_HOST = re.compile(  # a name (labels may hold `_`, one trailing dot allowed) or an IP, then :port
    r"^(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?(?::\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](?::\d{1,5})?$"
)


MAX_HOST = 255


@functools.lru_cache(maxsize=1024)
def valid_host(value: str) -> bool:
    """`host[:port]`: a DNS name, an IPv4 address or a bracketed IPv6 one, at most 255 characters."""
    return len(value) <= MAX_HOST and _HOST.match(value) is not None


def _first(value: str | None) -> str | None:
    return value.split(",", 1)[0].strip() if value else None


class ExternalUrl:
    """Derives `scheme://host[:port]` of the gateway for one request; built once from config."""

    __slots__ = ("_fixed", "_trusted")

    def __init__(self, advertise_url: str | None, trusted_proxies: tuple[str, ...]) -> None:
        self._fixed = advertise_url
        self._trusted = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in trusted_proxies)

    def _is_trusted(self, remote: str | None) -> bool:
        if not remote or not self._trusted:
            return False
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def for_request(
        self,
        *,
        remote: str | None,
        scheme: str,
        host: str | None,
        forwarded_proto: str | None,
        forwarded_host: str | None,
    ) -> str | None:
        """The external URL, or None when no trustworthy one can be told (then nothing is advertised)."""
        if self._fixed is not None:
            return self._fixed
        if self._is_trusted(remote):
            scheme = _first(forwarded_proto) or scheme
            host = _first(forwarded_host) or host
        if scheme not in ("http", "https") or not host or not valid_host(host):
            return None
        return f"{scheme}://{host.lower()}"
