"""Opening the gateway's listening sockets, and saying so when the admin one cannot be reached from outside.

Inside a container, 127.0.0.1 is the container's own loopback: a listener bound there is out of reach of
published ports and of the kubelet's probes. The proxy port may rightly stay there (a sidecar serves only
its own pod), but the admin listener exists to be probed, so that case is logged at start-up.

A TLS listener bounds its handshakes: asyncio hands a connection to the HTTP protocol only once its
handshake is done, so the protocol's head timeout starts after it and cannot see a client that connects and
never finishes (or never starts) one. aiohttp's `TCPSite` does not pass asyncio's `ssl_handshake_timeout`
(default 60 s); `aiohttp_internals.TlsSite` does, and the event loop closes a stalled handshake.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.aiohttp_internals import TlsSite, bound_port
from gateway.logs import get_logger
from gateway.policy.addresses import is_loopback

log = get_logger("gateway.listeners")
CONTAINER_MARKERS = (Path("/run/.containerenv"), Path("/.dockerenv"))  # podman and CRI-O; docker
BACKLOG = 1024


class StartupError(Exception):
    """A listener could not be opened; the message names it and says why, in one line."""


async def listen(
    runner: web.BaseRunner,
    name: str,
    host: str,
    port: int,
    reuse_port: bool = False,
    *,
    tls: tuple[ssl.SSLContext, float] | None = None,
) -> int:
    """Set up `runner` and listen on host:port; return the port bound (the one picked when `port` is 0).

    `tls`: serve HTTPS with this context, each handshake bounded to this many seconds.
    """
    await runner.setup()
    options: dict[str, Any] = {"backlog": BACKLOG, "reuse_address": True, "reuse_port": reuse_port or None}
    site: web.TCPSite
    if tls is None:
        site = web.TCPSite(runner, host, port, **options)
    else:
        context, handshake_timeout_s = tls
        site = TlsSite(
            runner, host, port, ssl_context=context, handshake_timeout_s=handshake_timeout_s, **options
        )
    try:
        await site.start()
    except OSError as exc:
        reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
        raise StartupError(f"cannot listen on {host}:{port} ({name}): {reason}") from None
    return bound_port(site)


def in_container(env: Mapping[str, str] = os.environ) -> bool:
    """A container runtime's marker file, or the variable Kubernetes sets in every pod."""
    return "KUBERNETES_SERVICE_HOST" in env or any(marker.exists() for marker in CONTAINER_MARKERS)


def warn_if_admin_unreachable(host: str, port: int) -> None:
    """The admin listener on loopback inside a container: probes fail and published ports reach nothing."""
    if is_loopback(host) and in_container():
        log.warning(
            "admin_unreachable_from_outside",
            admin=f"{host}:{port}",
            detail="inside a container only the container itself reaches loopback: probes and published "
            "ports cannot; set admin.host (and listen.host, unless this is a sidecar) to 0.0.0.0",
        )
