"""Forward-proxy authentication: `Proxy-Authorization: Basic` checked against scrypt hashes from config.

Hash grammar (what `bt-gateway hash-password` prints):
    scrypt$<log2 n>$<r>$<p>$<salt, base64>$<key, base64>
scrypt costs tens of milliseconds on purpose, so a verified header is remembered (by its sha256, in a
small bounded cache) and repeat requests on the hot path cost one dictionary lookup.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections import OrderedDict
from dataclasses import dataclass

from gateway.errors import Code, GatewayError

REALM_HEADER = ("Proxy-Authenticate", 'Basic realm="bt-gateway"')
_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class ScryptHash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @classmethod
    def parse(cls, text: str) -> ScryptHash:
        """Parse the module's hash grammar; raise ValueError saying what is wrong."""
        parts = text.split("$")
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError(
                "must look like scrypt$<log2 n>$<r>$<p>$<salt>$<key> (see bt-gateway hash-password)"
            )
        try:
            log2_n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt, key = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
        except (ValueError, binascii.Error) as exc:
            raise ValueError(f"is not a valid scrypt hash: {exc}") from None
        if not (10 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16 and salt and len(key) >= 16):
            raise ValueError("scrypt parameters out of range (log2 n 10-20, r 1-32, p 1-16)")
        return cls(log2_n, r, p, salt, key)

    def verify(self, password: str) -> bool:
        derived = _derive(password, self.salt, log2_n=self.log2_n, r=self.r, p=self.p, length=len(self.key))
        return hmac.compare_digest(derived, self.key)


def _derive(password: str, salt: bytes, *, log2_n: int, r: int, p: int, length: int) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=length, maxmem=256 * n * r * p + 2**20
    )


def hash_password(password: str, log2_n: int = 14, r: int = 8, p: int = 1) -> str:
    """A new salted scrypt hash in the module's grammar."""
    salt = os.urandom(16)
    key = _derive(password, salt, log2_n=log2_n, r=r, p=p, length=32)
    return f"scrypt${log2_n}${r}${p}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


_DECOY: list[ScryptHash] = []


def _decoy() -> ScryptHash:
    """A hash no password matches, made on first use (start-up stays fast when auth is off)."""
    if not _DECOY:
        _DECOY.append(ScryptHash.parse(hash_password(os.urandom(16).hex())))
    return _DECOY[0]


class ProxyAuth:
    """Checks Proxy-Authorization; `users` maps a user name to its parsed hash."""

    def __init__(self, users: dict[str, ScryptHash]) -> None:
        self._users = users
        self._verified: OrderedDict[bytes, str] = OrderedDict()

    def check(self, header: str | None) -> str | GatewayError:
        """The authenticated user name, or the 407 error (with its Proxy-Authenticate challenge)."""
        if header:
            digest = hashlib.sha256(header.encode("utf-8", "surrogateescape")).digest()
            user = self._verified.get(digest)
            if user is not None:
                self._verified.move_to_end(digest)
                return user
            user = self._verify(header)
            if user is not None:
                self._verified[digest] = user
                if len(self._verified) > _CACHE_SIZE:
                    self._verified.popitem(last=False)
                return user
        return GatewayError(Code.PROXY_AUTH_REQUIRED, "proxy authentication required", (REALM_HEADER,))

    def _verify(self, header: str) -> str | None:
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        stored = self._users.get(user)
        # Unknown names cost one scrypt too, so response time does not tell which user names exist.
        matched = (stored or _decoy()).verify(password)
        return user if sep and stored is not None and matched else None
