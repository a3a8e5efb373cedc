"""Who is calling: the caller's token and its sha256 fingerprint, never the raw secret.

The fingerprint is what logs, metrics and rate-limit storage keys carry, so a leaked log or a Redis dump
never yields a usable Braintrust API key.
"""

from __future__ import annotations

import hashlib

FINGERPRINT_HEX = 12


def bearer_token(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>`, or of a bare `Authorization: <raw key>`.

    Grammar: `Bearer` (any case) + whitespace + token; or a single word with no scheme. Other schemes
    (`Basic ...`) and empty values carry no token.
    """
    if not authorization:
        return None
    value = authorization.strip()
    scheme, _, rest = value.partition(" ")
    if rest:
        if scheme.lower() != "bearer":
            return None
        token = rest.strip()
        return token or None
    if value.lower() == "bearer":
        return None
    return value or None


def token_digest(token: str) -> str:
    """Full sha256 hex of the token: the storage key material (collisions must be impossible in practice)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def digest_of(authorization: str | None) -> str | None:
    """The sha256 of the request's token, or None without one: computed once per request."""
    token = bearer_token(authorization)
    return None if token is None else token_digest(token)


def fingerprint(token: str | None) -> str | None:
    """First 12 hex of sha256: enough to tell callers apart in a log, useless to an attacker."""
    if token is None:
        return None
    return token_digest(token)[:FINGERPRINT_HEX]
