"""The proxy listener's TLS: one listener context for its life, a fresh context for each certificate pair.

The listener's context only picks, at each handshake (its SNI callback, which runs with or without a
server name), the context of the pair loaded last, and the handshake goes on with that one. A rotation
builds a new context rather than loading into the serving one: OpenSSL keeps one certificate per key type
in a context, so loading an ECDSA pair over an RSA one would leave the old RSA key in service for clients
that ask for it. New handshakes present the new certificate while open connections keep theirs: no
restart, no second listener. The files are read again

- on every config reload (SIGHUP, `POST /reload`, `serve --watch`): `Gateway.reload` calls `use()`, which
  also follows a change of `cert_file`/`key_file`;
- when their content changes on disk (cert-manager renewing a mounted Secret swaps its `..data` symlink,
  as the kubelet does for a ConfigMap): a watcher (gateway/watch.py) over the two files, always on while
  TLS is, whether or not `--watch` is given: a renewal touches no config, and an unnoticed one turns into
  an outage when the old certificate expires.

A pair is read once into memory and loaded from that copy into its new context, which is put in service
only once it loaded. A pair that does not load (half-written, key of another certificate) changes
nothing: the old certificate keeps serving and one `tls_reload_failed` line says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

from gateway.config.certs import CertProblem, load_pair, server_context
from gateway.config.model import ListenTls
from gateway.logs import get_logger
from gateway.watch import POLL_INTERVAL_S, ConfigWatch, baseline

log = get_logger("gateway.listener_tls")


class ListenerTls:
    """The live server context, the settings it was loaded from, and the watcher of their files."""

    def __init__(self, settings: ListenTls, interval_s: float = POLL_INTERVAL_S) -> None:
        """Load the pair now; CertProblem if it does not load (the caller reports it as a config error)."""
        self.settings = settings
        self._interval_s = interval_s
        self._baseline = baseline(*_paths(settings))  # before the load: a change during it is then noticed
        # The listener holds the first context; every handshake moves to `_serving`, the latest one.
        self.context = self._serving = _loaded(settings)
        self.context.sni_callback = self._select
        self._watch: ConfigWatch | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    def watch(self) -> None:
        """Reload the pair whenever its files' content changes, until `close()`."""
        paths = _paths(self.settings)
        self._watch = ConfigWatch(
            paths[0], self._files_changed, interval_s=self._interval_s, also=paths[1:], topic="tls"
        )
        self._watch.start(self._baseline)

    async def use(self, settings: ListenTls) -> bool:
        """A config reload: read the (maybe other) files again and watch them from now; False if kept old."""
        async with self._lock:  # SIGHUP and POST /reload may overlap
            await self._stop_watching()
            self.settings = settings
            self._baseline = baseline(*_paths(settings))
            loaded = self.reload()
            if not self._closed:  # the gateway may have begun to stop meanwhile: no watcher left behind
                self.watch()
            return loaded

    async def close(self) -> None:
        """Stop watching for good (the gateway is stopping)."""
        self._closed = True
        await self._stop_watching()

    async def _stop_watching(self) -> None:
        if self._watch is not None:
            await self._watch.stop()
            self._watch = None

    def _select(
        self, connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _: ssl.SSLContext
    ) -> None:
        """The SNI callback: this handshake goes on with the context of the pair loaded last."""
        connection.context = self._serving

    def reload(self) -> bool:
        """Serve the current files from a context of their own if they load at all; else keep the old."""
        settings = self.settings
        try:
            self._serving = _loaded(settings)
        except CertProblem as exc:
            log.error("tls_reload_failed", problem=f"listen.tls.{exc.key}: {exc.message}")
            return False
        log.info("tls_reloaded", cert_file=settings.cert_file, key_file=settings.key_file)
        return True

    async def _files_changed(self) -> None:
        self.reload()


def _loaded(settings: ListenTls) -> ssl.SSLContext:
    """A new server context holding the pair the settings name; CertProblem if it does not load."""
    context = server_context()
    try:
        with _snapshot(settings) as copies:
            load_pair(context, *copies, _names(settings))
    except OSError as exc:  # the in-memory copy itself (no memory, no file descriptors)
        raise CertProblem("cert_file", f"cannot copy the pair to load it: {exc}") from None
    return context


def _paths(settings: ListenTls) -> tuple[Path, Path]:
    return Path(settings.cert_file), Path(settings.key_file)


def _names(settings: ListenTls) -> tuple[str, str]:
    return settings.cert_file, settings.key_file


@contextlib.contextmanager
def _snapshot(settings: ListenTls) -> Iterator[tuple[str, str]]:
    """Paths to an in-memory copy of the two files (Linux memfd: works on a read-only root filesystem);
    elsewhere the files themselves. A file that cannot be read is left to `load_pair` to report."""
    if not hasattr(os, "memfd_create"):
        yield settings.cert_file, settings.key_file
        return
    with contextlib.ExitStack() as stack:
        paths = []
        for path in (settings.cert_file, settings.key_file):
            try:
                data = Path(path).read_bytes()
            except OSError:
                paths.append(path)
                continue
            copy = stack.enter_context(open(os.memfd_create("bt-gateway-tls", os.MFD_CLOEXEC), "wb"))
            copy.write(data)
            copy.flush()
            paths.append(f"/proc/self/fd/{copy.fileno()}")
        yield paths[0], paths[1]
