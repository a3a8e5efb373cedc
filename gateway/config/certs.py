"""The proxy listener's TLS context, and loading a certificate and key into it with a reason when it fails.

Shared by the config check (a scratch context: do the files load?) and the listener (its one live context,
loaded again on rotation), so both read the files the same way and word a failure the same way. Stdlib
`ssl` only: the config package never imports aiohttp.

Settings: TLS 1.2 or newer, Python's default server ciphers and options, ALPN offering http/1.1 only
(the gateway speaks no HTTP/2). An encrypted key is refused rather than prompted for: OpenSSL would
otherwise ask for its passphrase on the terminal and hang a server with none.
"""

from __future__ import annotations

import ssl
from pathlib import Path

CERT_MARK = b"-----BEGIN CERTIFICATE-----"
KEY_MARK = b"PRIVATE KEY-----"


class CertProblem(ValueError):
    """The pair does not load; `key` is the config key to blame (`cert_file` or `key_file`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


class _Encrypted(Exception):
    """Raised by the passphrase callback: there is no passphrase to give."""


def server_context() -> ssl.SSLContext:
    """A server context with the gateway's settings and no certificate yet."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


def load_pair(
    context: ssl.SSLContext, cert_file: str, key_file: str, names: tuple[str, str] | None = None
) -> None:
    """Load the chain and key into `context`; raise CertProblem saying which file is wrong and why.

    `names` are the files as the config names them, when `cert_file`/`key_file` are copies of them. On
    failure `context` may be left without a usable key: when it is serving, check a copy first.
    """
    shown_cert, shown_key = names or (cert_file, key_file)
    for key, path, shown in (("cert_file", cert_file, shown_cert), ("key_file", key_file, shown_key)):
        try:
            Path(path).read_bytes()
        except OSError as exc:
            raise CertProblem(key, f"cannot read {shown!r}: {exc.strerror or exc}") from None
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except _Encrypted:
        raise CertProblem("key_file", f"{shown_key!r} is encrypted; give an unencrypted key") from None
    except (ssl.SSLError, OSError) as exc:
        raise _blame((cert_file, shown_cert), (key_file, shown_key), exc) from None


def check_pair(cert_file: str, key_file: str, names: tuple[str, str] | None = None) -> None:
    """Do the files load as a certificate chain and its key? CertProblem if not."""
    load_pair(server_context(), cert_file, key_file, names)


def _no_passphrase() -> bytes:
    raise _Encrypted


def _blame(cert: tuple[str, str], key: tuple[str, str], exc: Exception) -> CertProblem:
    """Which file a load failure is about: the one with no PEM block of its kind, the key when it is not
    the certificate's, else the certificate (a damaged PEM block)."""
    (cert_file, shown_cert), (key_file, shown_key) = cert, key
    reason = getattr(exc, "reason", None) or str(exc)
    if CERT_MARK not in _bytes(cert_file):
        return CertProblem("cert_file", f"{shown_cert!r} holds no PEM certificate")
    if KEY_MARK not in _bytes(key_file):
        return CertProblem("key_file", f"{shown_key!r} holds no PEM private key")
    if reason == "KEY_VALUES_MISMATCH":
        return CertProblem("key_file", f"{shown_key!r} is not the key of the certificate in cert_file")
    return CertProblem("cert_file", f"{shown_cert!r} does not load as a certificate chain ({reason})")


def _bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""
