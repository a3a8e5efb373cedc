"""The grammar of `rate_limit.storage`, checked at load so a wrong form never reaches the Redis client.

    memory://
    redis://[user[:password]@]host[:port][/db]           rediss:// the same, over TLS
    redis+sentinel://[user[:password]@]host[:port][,host[:port]...]/master_name
    redis+cluster://[user[:password]@]host[:port][,host[:port]...]

Ports default to 6379 (26379 for sentinels); an IPv6 host goes in brackets. No query string: TLS and the
password have their own keys (`storage_ca_bundle`, `storage_password_file`), so the URI can be printed.
A password written in the URI is still accepted, and masked wherever the config is shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, unquote

SCHEMES = ("memory", "redis", "rediss", "redis+sentinel", "redis+cluster")
_DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "redis+sentinel": 26379, "redis+cluster": 6379}
MASK = "***"


@dataclass(frozen=True, slots=True)
class StorageUri:
    """A parsed storage URI; `path` is the database number (redis, rediss) or the master's name (sentinel)."""

    scheme: str
    hosts: tuple[tuple[str, int], ...] = ()
    path: str = ""
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def text(self, *, password: str | None = None) -> str:
        """The canonical URI, with `password` (percent-encoded) in place of the given one (None: none)."""
        return self._with_password(None if password is None else quote(password, safe=""))

    def masked(self) -> str:
        """For printing: the password, if the URI carries one, is `***`; so is a user without one (some
        write `redis://PASSWORD@host`, and it cannot be told from an ACL user name)."""
        if self.password is None and self.user is not None:
            return self._with_password(None).replace(quote(self.user, safe="") + "@", MASK + "@", 1)
        return self._with_password(MASK if self.password is not None else None)

    def _with_password(self, encoded: str | None) -> str:
        if self.scheme == "memory":
            return "memory://"
        auth = ""
        if self.user is not None or encoded is not None:
            auth = quote(self.user or "", safe="") + (f":{encoded}" if encoded is not None else "") + "@"
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.hosts)
        return f"{self.scheme}://{auth}{hosts}" + (f"/{self.path}" if self.path else "")


def parse_storage_uri(text: str) -> StorageUri:
    """Parse `text`; raise ValueError saying what is wrong (never echoing a password)."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"must start with one of {', '.join(s + '://' for s in SCHEMES)}")
    if scheme == "memory":
        if rest:
            raise ValueError("memory:// takes nothing after it")
        return StorageUri("memory")
    if "?" in rest or "#" in rest:
        raise ValueError(
            "takes no query string: set rate_limit.storage_ca_bundle for TLS, and the password through "
            "rate_limit.storage_password_file or env BT_GATEWAY_RATE_LIMIT_STORAGE_PASSWORD"
        )
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    user = password = None
    if at:
        name, colon, secret = userinfo.partition(":")
        user, password = unquote(name) or None, (unquote(secret) if colon else None)
    hosts = tuple(_host_port(part, _DEFAULT_PORTS[scheme]) for part in hostlist.split(","))
    _check_path(scheme, len(hosts), path)
    return StorageUri(scheme, hosts, path, user, password)


def _check_path(scheme: str, hosts: int, path: str) -> None:
    if scheme in ("redis", "rediss"):
        if hosts != 1:
            raise ValueError(
                f"{scheme}:// takes one host (several are for redis+sentinel:// or redis+cluster://)"
            )
        if path and not (path.isascii() and path.isdigit()):
            raise ValueError(f"the database after the host must be a number, got {path!r}")
    elif scheme == "redis+sentinel":
        if not path or "/" in path:
            raise ValueError(
                "needs the master's name after the sentinels: redis+sentinel://host:26379/mymaster"
            )
    elif path:
        raise ValueError("redis+cluster:// takes no path: a cluster has database 0 only")


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, port_text = text[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise ValueError(f"bad host {text!r}: an IPv6 address goes in brackets, [::1]:6379")
        port_text = port_text[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host or any(c.isspace() or c in "@/" for c in host):
        raise ValueError(f"bad host {text!r}: host[:port], several separated by commas")
    if not port_text:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"bad port in {text!r}: a number from 1 to 65535")
    return host, int(port_text)
