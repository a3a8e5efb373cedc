"""`bt-gateway probe`: the container health check, asked from where the outside asks.

A check over loopback passes even when the admin listener is bound to 127.0.0.1 inside a container, where
no published port and no kubelet probe can reach it; this one asks at the host's own address (the name
the container runtime or the pod gives it), so that mistake shows as unhealthy instead of passing unseen.
"""

from __future__ import annotations

import http.client
import socket

from gateway.config.model import Admin
from gateway.listeners import is_loopback

TIMEOUT_S = 2.0
WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def own_address() -> str:
    """The address this host's name resolves to: the container's (or pod's) address on its network."""
    return socket.gethostbyname(socket.gethostname())


def probe(admin: Admin, path: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """GET `path` on the admin listener as the outside reaches it; None when it answers 200, else why."""
    if admin.port == 0:
        return "admin.port is 0 (a random port): nothing outside can know where to probe"
    loopback = is_loopback(admin.host)
    try:
        host = own_address() if admin.host in WILDCARDS or loopback else admin.host
    except OSError as exc:
        return f"this host's own address is unknown: {exc}"
    where = f"{host}:{admin.port}"
    connection = http.client.HTTPConnection(host, admin.port, timeout=timeout_s)
    try:
        connection.request("GET", path)
        status = connection.getresponse().status
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        hint = f" (admin.host is {admin.host}: only this host itself reaches it)" if loopback else ""
        return f"admin listener at {where} unreachable: {reason.lower()}{hint}"
    finally:
        connection.close()
    return None if status == 200 else f"{path} at {where} answered {status}"
