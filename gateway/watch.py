"""`serve --watch`: notice that the config file's content changed, and reload.

Kubernetes delivers a ConfigMap edit as a new file and sends no SIGHUP: the kubelet writes a new
`..<timestamp>/` directory beside the mounted files and atomically swaps the `..data` symlink to it
(`gateway.yaml -> ..data/gateway.yaml`). Editors save in place (same inode, maybe the same size and
mtime second) or by renaming a new file over the old. Every case is caught by one rule: read the
configured path, following symlinks, and compare a sha256 of its bytes with the last one seen. Polling
once a second is enough (the kubelet takes up to a minute to propagate) and needs no dependency. A new
content is reloaded once two polls in a row read it, so a file that one poll catches half-written is not
loaded (a writer stalled for longer than a poll is not told apart; a ConfigMap swap is atomic).

A changed file goes through `Gateway.reload()`, the same rules as SIGHUP. The digest is then remembered
whatever the result, so a bad file is logged once (by the reload) and not once per poll; the next change,
the fix, is reloaded. A file that cannot be read (gone between an unlink and a create, or mid-swap) is
not a change: nothing is reloaded, the last digest is kept, and `config_watch_unreadable` is logged once
only if it is still unreadable on the next poll too. Under `workers: N` each worker process runs its own
watcher on the same file (the supervisor passes `--watch` on with the rest of argv).

The same watcher serves the TLS listener's certificate and key (gateway/listener_tls.py): a set of files
whose digest is taken together, so a Secret swapping both at once is one change; its events are named
`tls_watch_*` instead of `config_watch_*`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway.logs import get_logger

POLL_INTERVAL_S = 1.0
UNREADABLE_POLLS = 2  # consecutive failed reads before one warning: a swap in progress says nothing


class ConfigWatch:
    """Polls one config file (and `also` these) and calls `reload` when their content changed since."""

    def __init__(
        self,
        path: Path,
        reload: Callable[[], Awaitable[object]],
        on_check: Callable[[], None] = lambda: None,
        interval_s: float = POLL_INTERVAL_S,
        *,
        also: tuple[Path, ...] = (),
        topic: str = "config",
    ) -> None:
        """`on_check` runs after each poll (a metric), so that tests and operators can see it polling.

        `topic` names the log events (`<topic>_watch_started`, ...) and their file field.
        """
        self.path = path
        self._paths = (path, *also)
        self._topic = topic
        self._reload = reload
        self._on_check = on_check
        self._interval_s = interval_s
        self._digest: bytes | None = None  # of the content last reloaded (or serving at start)
        self._settling: bytes | None = None  # of a new content seen once, reloaded if seen again
        self._unreadable = 0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, baseline: bytes | None) -> None:
        """Poll in the background until `stop()`; `baseline` is the digest of the content serving now.

        Read it before the config is loaded (`baseline()`): an edit during the load then differs from it
        and is reloaded, where a digest read after the start would take the edit as already served.
        """
        self._digest = baseline
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self._topic}-watch")
        self._log("info", "started", interval_s=self._interval_s)

    async def stop(self) -> None:
        """End the polling; a check under way (a reload, say) finishes first, so nothing is cut midway."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)
            if self._stopping.is_set():
                return
            try:
                await self.check()
            except Exception as exc:  # a bug must not end the watching silently
                self._log("exception", "error", error=repr(exc))

    async def check(self) -> bool:
        """One poll: reload if the content changed and stayed so since the last poll; True if it did.

        A new content is reloaded on the poll after the one that first saw it, if unchanged by then: a
        save in place (truncate, then write) can be read half-written, and that half must not be loaded.
        """
        try:
            digest = await self._read_digest()
            if digest is None or digest == self._digest:
                self._settling = None
                return False
            if digest != self._settling:
                self._settling = digest
                return False
            self._digest, self._settling = digest, None  # kept even if the reload fails: logged once
            await self._reload()
            return True
        finally:
            self._on_check()

    async def _read_digest(self) -> bytes | None:
        """The sha256 of the files' bytes (symlinks followed), or None when one cannot be read now."""
        try:
            digest = await asyncio.to_thread(files_digest, self._paths)
        except OSError as exc:
            self._unreadable += 1
            if self._unreadable == UNREADABLE_POLLS:
                self._log("warning", "unreadable", error=exc.strerror or str(exc))
            return None
        if self._unreadable >= UNREADABLE_POLLS:
            self._log("info", "readable")
        self._unreadable = 0
        return digest

    def _log(self, level: str, what: str, **fields: object) -> None:
        """`<topic>_watch_<what>`, naming the file watched (the first one: the config, or the certificate)."""
        getattr(_log(), level)(f"{self._topic}_watch_{what}", **{self._topic: str(self.path)}, **fields)


def _log() -> Any:
    """Made when used, not at import: the CLI imports this module (`baseline`) before logging is set up."""
    return get_logger("gateway.watch")


def file_digest(path: Path) -> bytes:
    """The sha256 of a file's bytes, symlinks followed (a ConfigMap's `..data` swap changes it)."""
    return hashlib.sha256(path.read_bytes()).digest()


def baseline(*paths: Path) -> bytes | None:
    """The digest to start watching from, read before what the files hold is loaded (an edit during the
    load then differs from it), or None when they cannot be read now (the load says why; if it works
    after all, the first poll reloads)."""
    try:
        return files_digest(paths)
    except OSError:
        return None


def files_digest(paths: tuple[Path, ...]) -> bytes:
    """One sha256 over several files' digests: any of them changing changes it."""
    if len(paths) == 1:
        return file_digest(paths[0])
    return hashlib.sha256(b"".join(file_digest(path) for path in paths)).digest()
