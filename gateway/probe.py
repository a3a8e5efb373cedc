"""`bt-gateway probe`: the container health check, asked from where the outside asks.

A check over loopback passes even when the admin listener is bound to 127.0.0.1 inside a container, where
no published port and no kubelet probe can reach it; this one asks at the host's own address (the name
the container runtime or the pod gives it), so that mistake shows as unhealthy instead of passing unseen.
"""

from __future__ import annotations

import http.client
import socket

from gateway.config.model import Admin
from gateway.policy.addresses import WILDCARDS, is_loopback

TIMEOUT_S = 2.0


def own_address() -> str:
    """This host's address as others reach it: what its name resolves to (the container's or the pod's
    address, by the runtime's /etc/hosts), else, where the name is loopback (host networking, a Debian
    127.0.1.1), the source address of the default route (a UDP connect sends no packet)."""
    address = socket.gethostbyname(socket.gethostname())
    if not is_loopback(address):
        return address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.connect(("192.0.2.1", 9))  # TEST-NET-1: any routable address will do
        return str(udp.getsockname()[0])


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
