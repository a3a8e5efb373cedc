"""Who may use the admin listener: the Host, cross-site and token rules, decided without sockets.

Three attacks are closed here. DNS rebinding: a page on `evil.example` whose name later resolves to the
gateway sends requests whose `Host` is `evil.example`; only requests naming the listener itself (any IP
literal, `localhost`, this host's name, `admin.host`, `admin.allowed_hosts`) are answered. Cross-site
requests: a browser form on any site can POST to 127.0.0.1; browsers mark those with `Origin` /
`Sec-Fetch-Site` and can only send "simple" content types without a preflight, so either refuses a
state-changing request. Anyone on the network: a non-loopback listener needs `admin.token` for them.

Endpoints are open only when listed in `OPEN` (read-only probes, the scrape and the status page); everything
else is state-changing, so a new endpoint is guarded unless someone deliberately opens it.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.errors import Code, GatewayError
from gateway.policy.addresses import WILDCARDS, is_loopback
from gateway.policy.credentials import token_digest

OPEN: frozenset[tuple[str, str]] = frozenset(
    (method, path)
    for path in ("/healthz", "/readyz", "/metrics", "/status", "/status.json")
    for method in ("GET", "HEAD")
)
SIMPLE_CONTENT_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})
SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})  # `none`: typed in the address bar, no page asked
BEARER = "bearer "
CHALLENGE = (("WWW-Authenticate", 'Bearer realm="bt-gateway admin"'),)


def host_name(authority: str) -> str:
    """The name in a `Host` value: `name[:port]`, `[v6]:port` or `ipv4[:port]`; lowercased, no final dot."""
    value = authority.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host_header: str | None, own_names: frozenset[str]) -> bool:
    """Any IP literal (no rebinding page can be served from a bare address's origin) or one of ours.

    No Host at all (HTTP/1.0 clients) is allowed: a browser always sends one.
    """
    if host_header is None:
        return True
    name = host_name(host_header)
    return is_ip_literal(name) or name in own_names


def cross_site_reason(headers: Mapping[str, str]) -> str | None:
    """Why a state-changing request looks like a browser's cross-site one, or None. `headers` must be
    case-insensitive (aiohttp's CIMultiDict). curl, kubectl and the SDKs send none of these."""
    fetch_site = headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site.strip().lower() not in SAME_ORIGIN_FETCH:
        return f"Sec-Fetch-Site is {fetch_site.strip()!r}"
    origin = headers.get("Origin")
    if origin is not None and not _same_origin(origin, headers.get("Host")):
        return f"Origin {origin.strip()!r} is not this listener"
    media_type = headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if media_type in SIMPLE_CONTENT_TYPES:
        return f"Content-Type {media_type} is what a cross-site form sends"
    return None


def _same_origin(origin: str, host_header: str | None) -> bool:
    """`Origin: http://<the Host header>`: the only page that may ask is one this listener served."""
    scheme, _, authority = origin.strip().lower().partition("://")
    return scheme == "http" and host_header is not None and authority == host_header.strip().lower()


def bearer_matches(authorization: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time (digests, so the length leaks too)."""
    if authorization is None or authorization[: len(BEARER)].lower() != BEARER:
        return False
    given = authorization[len(BEARER) :].strip()
    return hmac.compare_digest(token_digest(given), token_digest(token))


def state_changes_open(token: str | None, host: str) -> bool:
    """Without a token, state-changing endpoints are served only where only this host can ask (what
    `AdminAccess.check` enforces, and the start-up warning says)."""
    return token is not None or is_loopback(host)


@dataclass(frozen=True, slots=True)
class AdminAccess:
    """The admin listener's rules for one config: built at start and at each reload."""

    token: str | None
    loopback: bool  # the listener is bound to loopback: only this host reaches it
    own_names: frozenset[str]

    @classmethod
    def build(
        cls, host: str, token: str | None, allowed_hosts: Iterable[str], this_host: Iterable[str]
    ) -> AdminAccess:
        """`this_host`: the machine's own names (its hostname); `host` joins them when it is a name."""
        names = {"localhost", *(n.lower().rstrip(".") for n in (*allowed_hosts, *this_host) if n)}
        if host not in WILDCARDS and not is_ip_literal(host):
            names.add(host.lower().rstrip("."))
        return cls(token=token, loopback=is_loopback(host), own_names=frozenset(names))

    def check(self, method: str, path: str, headers: Mapping[str, str]) -> GatewayError | None:
        """None to serve the request, else the refusal. Host first: a rebinding page learns nothing."""
        if not host_allowed(headers.get("Host"), self.own_names):
            return GatewayError(
                Code.ADMIN_HOST_DENIED,
                "Host does not name this admin listener (an IP address, localhost, this host's name or "
                "admin.allowed_hosts)",
            )
        if (method, path) in OPEN:
            return None
        why = cross_site_reason(headers)
        if why is not None:
            return GatewayError(Code.CROSS_SITE_DENIED, f"refused as a cross-site browser request: {why}")
        if self.token is None:
            if self.loopback:
                return None
            return GatewayError(
                Code.ADMIN_TOKEN_NOT_SET,
                "this admin listener is not on loopback and admin.token is not set: "
                f"{method} {path} is disabled",
            )
        if not bearer_matches(headers.get("Authorization"), self.token):
            return GatewayError(
                Code.ADMIN_TOKEN_INVALID, "missing or wrong Authorization: Bearer token", headers=CHALLENGE
            )
        return None
