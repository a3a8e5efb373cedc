"""Who is calling: the caller's token and its sha256 fingerprint, never the raw secret.

The fingerprint is what logs, metrics and rate-limit storage keys carry, so a leaked log or a Redis dump
never yields a usable Braintrust API key.
"""

from __future__ import annotations

import hashlib

FINGERPRINT_HEX = 12


def bearer_token(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>`, or of a bare `Authorization: <raw key>`.

    Grammar: `Bearer` (any case) + spaces or tabs + token; or a single word with no scheme. Whitespace
    around and between is not part of the token, so `Bearer  X`, `bearer X` and `Bearer<TAB>X` are one
    token and one rate-limit bucket. Other schemes (`Basic ...`) and empty values carry no token.
    """
    if not authorization:
        return None
    parts = authorization.split(None, 1)
    if not parts:
        return None
    if len(parts) == 2:
        return parts[1].strip() if parts[0].lower() == "bearer" else None
    return None if parts[0].lower() == "bearer" else parts[0]


def token_digest(token: str) -> str:
    """Full sha256 hex of the token: the storage key material (collisions must be impossible in practice)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def digest_of(authorization: str | None) -> str | None:
    """The sha256 of the request's token, or None without one: computed once per request (and never
    cached, so no raw token outlives its request in memory)."""
    token = bearer_token(authorization)
    return None if token is None else token_digest(token)


def fingerprint(token: str | None) -> str | None:
    """First 12 hex of sha256: enough to tell callers apart in a log, useless to an attacker."""
    if token is None:
        return None
    return token_digest(token)[:FINGERPRINT_HEX]
