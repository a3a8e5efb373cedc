"""The signed-URL relay: object-store transfers the SDKs would make directly go through the gateway.

The data plane hands out signed URLs (`signedUrl` for an upload slot: `/logs3/overflow`, `/attachment`;
`downloadUrl` for an attachment). In a JSON response of an advertised route, each such URL whose host is
in `relay.allow_hosts` becomes `<gateway>/_relay/<token>`; the token carries the original URL, signed,
and expires with it. A request to `/_relay/<token>` goes to the original URL (the allow-list, the route's
rate limit and the access log apply); a forged, altered, expired or unknown token gets `403 relay_denied`
and no connection is made, so the relay is never an open proxy. A transfer counts in the rate-limit bucket
of the token whose request received the link (its sha256, never the token, rides in the link), so the
SDK's upload needs no credential of its own; a link handed to an anonymous request stays anonymous.

Only https is relayed: an `allow_hosts` entry without a port allows port 443, one with a port that port.
One function (`Relay.target`) judges a URL both when a link is made and when it is opened, and puts the
host in the allow-list's canonical (IDNA) form, the form the connection is then made to: a unicode name
and its `xn--` form are one host at both steps.

Token grammar:  token = payload "." mac
    payload = base64url(JSON {"u": url, "e": expiry (unix seconds), "m": "up" | "down", "r": route,
                              "t": sha256 hex of the token the link was handed to, or null})
    mac     = base64url(HMAC-SHA256(secret, payload))
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from multidict import MultiDictProxy
from yarl import URL

from gateway.errors import Code, GatewayError, Reason
from gateway.policy.allowlist import Allowlist, canonical_host

PREFIX = "/_relay/"
URL_KEYS = {"signedUrl": "up", "downloadUrl": "down"}  # where the SDKs read signed URLs, and their use
METHODS = {"up": frozenset({"PUT", "POST"}), "down": frozenset({"GET", "HEAD"})}
DENIED = GatewayError(Code.RELAY_DENIED, "this relay link is not valid", reason=Reason.RELAY_TOKEN)
_PROCESS_SECRET = secrets.token_bytes(32)  # when relay.secret is unset: this process only
HTTPS_PORT = 443  # an allow_hosts entry without a port


@dataclass(frozen=True, slots=True)
class RelayGrant:
    """What a verified token allows: one URL, for one kind of transfer, in a route and token's bucket."""

    url: URL
    route: str
    token_digest: str | None = None  # sha256 hex of the token the link was handed to; None: anonymous


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signed_url_expiry(url: URL) -> float | None:
    """When a presigned S3 / GCS / Azure URL stops working, from its own query, or None if it says not
    (or says something odd: not a number, NaN, infinite, out of range)."""
    try:
        expiry = _expiry(url.query)
    except (ValueError, OverflowError):
        return None
    return expiry if expiry is not None and math.isfinite(expiry) else None


def _expiry(query: MultiDictProxy[str]) -> float | None:
    """The expiry a presigned query states; raises ValueError or OverflowError on a malformed one."""
    if "X-Amz-Expires" in query and "X-Amz-Date" in query:
        start = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        return start.timestamp() + int(query["X-Amz-Expires"])
    if "X-Goog-Expires" in query and "X-Goog-Date" in query:
        start = datetime.strptime(query["X-Goog-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        return start.timestamp() + int(query["X-Goog-Expires"])
    if "se" in query:  # Azure SAS: an ISO 8601 time
        return datetime.fromisoformat(query["se"].replace("Z", "+00:00")).timestamp()
    if "Expires" in query:  # S3 signature version 2
        return float(query["Expires"])
    return None


class Relay:
    """Signs relay links for allowed object-store hosts and opens them again; built once from config."""

    def __init__(
        self,
        allow_hosts: Allowlist,
        secret: bytes | None,
        max_ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # An entry without a port means https's own port here, not any port as in the egress allow-list.
        self._hosts = Allowlist(tuple(replace(e, port=e.port or HTTPS_PORT) for e in allow_hosts.entries))
        self._secret = secret or _PROCESS_SECRET
        self._max_ttl_s = max_ttl_s
        self._clock = clock

    def link(self, url: str, use: str, route: str, gateway_url: str, token_digest: str | None) -> str | None:
        """The relay link for a signed URL handed to the caller whose token has `token_digest`, or None when
        it is not one to relay (`target`)."""
        parsed = self.target(url)
        if parsed is None:
            return None
        now = self._clock()
        expiry = min(signed_url_expiry(parsed) or now + self._max_ttl_s, now + self._max_ttl_s)
        fields = {"u": str(parsed), "e": round(expiry), "m": use, "r": route, "t": token_digest}
        payload = _b64(json.dumps(fields).encode())
        return f"{gateway_url}{PREFIX}{payload}.{self._mac(payload)}"

    def open(self, token: str, method: str) -> RelayGrant | GatewayError:
        """The grant a token carries, or `relay_denied` (forged, altered, expired, wrong method)."""
        payload, _, mac = token.partition(".")
        if not hmac.compare_digest(mac, self._mac(payload)):
            return DENIED
        try:
            fields = json.loads(_unb64(payload))
            url, expiry, use, route = self.target(fields["u"]), fields["e"], fields["m"], fields["r"]
            digest = fields.get("t")
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            return DENIED
        if url is None or expiry < self._clock() or method not in METHODS.get(use, ()):
            return DENIED
        return RelayGrant(url=url, route=str(route), token_digest=digest if isinstance(digest, str) else None)

    def target(self, url: str) -> URL | None:
        """The signed URL as the relay connects to it, or None when it is not one to relay.

        https only, no userinfo, a host of `allow_hosts` on the entry's port (443 without one). The host is
        put in `canonical_host` form, the allow-list's and the connector's; path and query stay byte for byte
        (they carry the signature).
        """
        try:
            parsed = URL(url, encoded=True)
        except (ValueError, TypeError):
            return None
        host = canonical_host(parsed.raw_host)
        if parsed.scheme != "https" or parsed.raw_user is not None or host is None or parsed.port is None:
            return None
        if not self._hosts.allows(host, parsed.port):
            return None
        return parsed if parsed.raw_host == host else parsed.with_host(host)

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())


def signed_urls(doc: Any) -> Iterator[tuple[dict[str, Any], str]]:
    """Every (object, key) of a parsed JSON document whose string value is a signed URL (`URL_KEYS`)."""
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and key in URL_KEYS:
                    yield node, key
                elif isinstance(value, dict | list):
                    stack.append(value)
