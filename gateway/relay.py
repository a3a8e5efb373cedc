"""The signed-URL relay: object-store transfers the SDKs would make directly go through the gateway.

The data plane hands out signed URLs (`signedUrl` for an upload slot: `/logs3/overflow`, `/attachment`;
`downloadUrl` for an attachment). In a JSON response of an advertised route, each such URL whose host is
in `relay.allow_hosts` becomes `<gateway>/_relay/<token>`; the token carries the original URL, signed,
and expires with it. A request to `/_relay/<token>` goes to the original URL (the allow-list, the route's
rate limit and the access log apply); a forged, altered, expired or unknown token gets `403 relay_denied`
and no connection is made, so the relay is never an open proxy.

Token grammar:  token = payload "." mac
    payload = base64url(JSON {"u": url, "e": expiry (unix seconds), "m": "up" | "down", "r": route})
    mac     = base64url(HMAC-SHA256(secret, payload))
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from yarl import URL

from gateway.errors import Code, GatewayError, Reason
from gateway.logs import get_logger
from gateway.policy.allowlist import Allowlist

PREFIX = "/_relay/"
URL_KEYS = {"signedUrl": "up", "downloadUrl": "down"}  # where the SDKs read signed URLs, and their use
METHODS = {"up": frozenset({"PUT", "POST"}), "down": frozenset({"GET", "HEAD"})}
DENIED = GatewayError(Code.RELAY_DENIED, "this relay link is not valid", reason=Reason.RELAY_TOKEN)
_PROCESS_SECRET = secrets.token_bytes(32)  # when relay.secret is unset: this process only
log = get_logger("gateway.relay")


@dataclass(frozen=True, slots=True)
class RelayGrant:
    """What a verified token allows: one URL, for one kind of transfer, in one route's bucket."""

    url: URL
    route: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signed_url_expiry(url: URL) -> float | None:
    """When a presigned S3 / GCS / Azure URL stops working, from its own query, or None if it says not."""
    query = url.query
    try:
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
    except ValueError:
        return None
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
        self._hosts = allow_hosts
        self._secret = secret or _PROCESS_SECRET
        self._max_ttl_s = max_ttl_s
        self._clock = clock
        self._told: set[str] = set()  # hosts already logged as not allowed: once each

    def link(self, url: str, use: str, route: str, gateway_url: str) -> str | None:
        """The relay link for a signed URL, or None when its host is not one to relay."""
        try:
            parsed = URL(url)
        except ValueError:
            return None
        host = parsed.raw_host
        if parsed.scheme not in ("http", "https") or not self._hosts.allows(host, parsed.port or 0):
            shown = (host or "")[:255]
            if shown and shown not in self._told:
                self._told.add(shown)
                log.warning("relay_host_not_allowed", host=shown, detail="add it to relay.allow_hosts")
            return None
        now = self._clock()
        expiry = min(signed_url_expiry(parsed) or now + self._max_ttl_s, now + self._max_ttl_s)
        payload = _b64(json.dumps({"u": url, "e": round(expiry), "m": use, "r": route}).encode())
        return f"{gateway_url}{PREFIX}{payload}.{self._mac(payload)}"

    def open(self, token: str, method: str) -> RelayGrant | GatewayError:
        """The grant a token carries, or `relay_denied` (forged, altered, expired, wrong method)."""
        payload, _, mac = token.partition(".")
        if not hmac.compare_digest(mac, self._mac(payload)):
            return DENIED
        try:
            fields = json.loads(_unb64(payload))
            url, expiry, use, route = URL(fields["u"], encoded=True), fields["e"], fields["m"], fields["r"]
        except (ValueError, KeyError, TypeError, binascii.Error):
            return DENIED
        if expiry < self._clock() or method not in METHODS.get(use, ()):
            return DENIED
        return RelayGrant(url=url, route=str(route))

    def rewrite(self, doc: Any, route: str, gateway_url: str) -> bool:
        """Replace, in place, every relayable URL under `URL_KEYS` in a parsed JSON document."""
        changed = False
        stack = [doc]
        while stack:
            node = stack.pop()
            if isinstance(node, list):
                stack.extend(node)
            elif isinstance(node, dict):
                for key, value in node.items():
                    if isinstance(value, str) and key in URL_KEYS:
                        link = self.link(value, URL_KEYS[key], route, gateway_url)
                        if link is not None:
                            node[key] = link
                            changed = True
                    elif isinstance(value, dict | list):
                        stack.append(value)
        return changed

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())
