"""`workers: N`: N gateway processes share the listen port (SO_REUSEPORT), watched by a small supervisor.

One event loop uses one core; more processes use more. The kernel spreads new connections over the
workers. Each worker is the ordinary `serve` in a process of its own (`BT_GATEWAY_WORKER=<index>`), so
it reads the same config, and its admin listener is `admin.port + index`. The supervisor forwards
SIGTERM, SIGINT and SIGHUP to every worker. A worker that exits on its own is restarted, as nginx's
master does, after a wait that doubles while it keeps dying young; a worker in a crash loop (dying young
five times in a row) stops the others and fails the supervisor, so its orchestrator sees it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

from gateway.logs import get_logger

WORKER_ENV = "BT_GATEWAY_WORKER"  # set by the supervisor: this process is worker <index>
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # what a gateway acts on: stop, stop, reload


def ignore_late_signals() -> None:
    """Stopped: a late signal (a second Ctrl-C to the process group, an orchestrator's repeat) must not
    turn the exit code into a death by signal. Ignored from here on: an event loop's handlers are left
    registered, since removing one restores the default action (death) first, and uvloop leaves them alone
    on close; Python's own clean-up restores defaults only for handlers written in Python, never SIG_IGN."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def worker_index() -> int | None:
    """This process's worker index when a supervisor started it, else None."""
    value = os.environ.get(WORKER_ENV, "")
    return int(value) if value.isdigit() else None


RESTART_FIRST_S = 0.5  # the wait before restarting a worker that died young; doubled each time
STEADY_S = 10.0  # a worker that lived this long died on its own, not in a crash loop: restarted at once
QUICK_DEATHS = 5  # this many young deaths in a row of one worker: the supervisor gives up and exits


@dataclass(slots=True)
class _Slot:
    """One worker index: its process (None while a restart is due), and its record of young deaths."""

    process: subprocess.Popen[bytes] | None = None
    pidfd: int = -1
    started: float = 0.0
    restart_at: float | None = None
    young_deaths: int = 0


def restart_delay(lived_s: float, young_deaths: int) -> float:
    """0 after a steady life; else 0.5 s doubled per young death in a row (0.5, 1, 2, 4)."""
    return 0.0 if lived_s >= STEADY_S else RESTART_FIRST_S * 2 ** (young_deaths - 1)


def _hangup_ignored() -> None:
    """In a new worker before exec: SIGHUP stays ignored until the worker holds it (gateway/hangup.py),
    so a SIGHUP forwarded while its interpreter starts cannot kill it."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


class Supervisor:
    """Runs N workers of `bt-gateway <argv>` until a stop signal; restarts one that dies.

    A worker that dies is restarted (after a wait that doubles while it keeps dying young); one that
    dies young QUICK_DEATHS times in a row stops the others and the supervisor exits with its code, so a
    gateway that cannot run is seen by its orchestrator instead of spinning. Exit 0 after a stop signal.
    """

    def __init__(self, count: int, argv: Sequence[str]) -> None:
        self._log = get_logger("gateway.workers")  # not at import: the CLI has configured logging by now
        self._command = [sys.executable, "-m", "gateway", *argv]
        self._slots = [_Slot() for _ in range(count)]
        self._stopping = False
        self._stop_signal = signal.SIGTERM  # as received: also sent to a worker started meanwhile
        self._stops = 0
        self.code = 0

    def forward(self, signum: int, _: FrameType | None) -> None:
        """The supervisor's handler: stop signals stop it (and are passed on); SIGHUP is passed on."""
        if signum != signal.SIGHUP:
            self._stops += 1
            if self._stops > 2:  # a worker acts on two (drain, then end the delay); more, arriving faster
                return  # than they are forwarded, would re-enter this handler without end
            self._stopping, self._stop_signal = True, signal.Signals(signum)
            if self._stops == 2:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_IGN)
        for slot in self._slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(signum)

    def run(self) -> int:
        wake_read, wake_write = os.pipe()  # a signal wakes the wait below (it may cancel a restart)
        for fd in (wake_read, wake_write):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        for sig in SIGNALS:
            signal.signal(sig, self.forward)
        for index, slot in enumerate(self._slots):
            if self._stopping:
                break
            self._start(index, slot)
        self._log.info("workers_started", workers=len(self._slots), pids=self._pids())
        try:
            while any(slot.process is not None or slot.restart_at is not None for slot in self._slots):
                self._wait(wake_read)
                for index, slot in enumerate(self._slots):
                    self._tend(index, slot)
        finally:
            signal.set_wakeup_fd(-1)
            os.close(wake_read)
            os.close(wake_write)
        return self.code

    def _pids(self) -> list[int]:
        return [slot.process.pid for slot in self._slots if slot.process is not None]

    def _start(self, index: int, slot: _Slot) -> None:
        env = {**os.environ, WORKER_ENV: str(index)}
        slot.process = subprocess.Popen(self._command, env=env, preexec_fn=_hangup_ignored)  # noqa: PLW1509
        slot.pidfd = os.pidfd_open(slot.process.pid)
        slot.started, slot.restart_at = time.monotonic(), None
        if self._stopping:  # the stop came while it was being started, before `forward` could see it
            slot.process.send_signal(self._stop_signal)

    def _wait(self, wake_read: int) -> None:
        """Until a worker exits, a signal comes or a restart is due."""
        due = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
        timeout = max(0.0, min(due) - time.monotonic()) if due else None
        select.select([wake_read, *(slot.pidfd for slot in self._slots if slot.process)], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            os.read(wake_read, 4096)

    def _tend(self, index: int, slot: _Slot) -> None:
        """Reap the slot's worker if it exited; start it again when its restart is due."""
        process = slot.process
        if process is not None and process.poll() is not None:
            os.close(slot.pidfd)
            slot.process, slot.pidfd = None, -1
            self._exited(index, slot, process)
        if self._stopping:
            slot.restart_at = None
        elif slot.restart_at is not None and slot.restart_at <= time.monotonic():
            self._start(index, slot)
            self._log.info("worker_restarted", worker=index, pid=slot.process.pid if slot.process else None)

    def _exited(self, index: int, slot: _Slot, process: subprocess.Popen[bytes]) -> None:
        exit_code = process.returncode
        failed = exit_code if exit_code > 0 else 1
        if self._stopping:  # one killed by the stop itself, before it could handle it, did not fail
            if self.code == 0 and exit_code not in (0, -self._stop_signal):
                self.code = failed
            return
        lived = time.monotonic() - slot.started
        slot.young_deaths = 0 if lived >= STEADY_S else slot.young_deaths + 1
        where = {"worker": index, "pid": process.pid, "exit_code": exit_code}
        if slot.young_deaths < QUICK_DEATHS:
            delay = restart_delay(lived, slot.young_deaths)
            self._log.error("worker_exited", **where, restart_in_s=delay)
            slot.restart_at = time.monotonic() + delay
            return
        detail = f"died young {QUICK_DEATHS} times in a row: stopping the other workers"
        self._log.error("worker_exited", **where, detail=detail)
        self._stopping, self.code = True, failed
        for other in self._slots:
            if other.process is not None:
                other.process.send_signal(signal.SIGTERM)


def supervise(count: int, argv: Sequence[str]) -> int:
    """Start `count` workers running `bt-gateway <argv>` and tend them; the exit code is a failure's."""
    code = Supervisor(count, argv).run()
    ignore_late_signals()  # every worker is gone: the supervisor's own way out
    return code
