"""`workers: N`: N gateway processes share the listen port (SO_REUSEPORT), watched by a small supervisor.

One event loop uses one core; more processes use more. The kernel spreads new connections over the
workers. Each worker is the ordinary `serve` in a process of its own (`BT_GATEWAY_WORKER=<index>`), so
it reads the same config, and its admin listener is `admin.port + index`. The supervisor forwards
SIGTERM, SIGINT and SIGHUP to every worker. When one worker exits on its own, the others are stopped and
the supervisor exits non-zero: a half-running gateway is restarted whole by its orchestrator rather than
kept limping (nginx's master respawns workers instead; a container's restart policy does that here).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
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


def supervise(count: int, argv: Sequence[str]) -> int:
    """Start `count` workers running `bt-gateway <argv>` and wait; the exit code is the first failure's."""
    log = get_logger("gateway.workers")  # here, not at import: the CLI has configured logging by now
    stopping = False
    workers: list[subprocess.Popen[bytes]] = []
    stops = 0

    def forward(signum: int, _: FrameType | None) -> None:
        nonlocal stopping, stops
        if signum != signal.SIGHUP:
            stops += 1
            if stops > 2:  # a worker acts on two (drain, then end the delay); more, arriving faster than
                return  # they are forwarded, would re-enter this handler without end
            stopping = True
            if stops == 2:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_IGN)
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    for sig in SIGNALS:
        signal.signal(sig, forward)
    command = [sys.executable, "-m", "gateway", *argv]
    for index in range(count):
        workers.append(subprocess.Popen(command, env={**os.environ, WORKER_ENV: str(index)}))
    log.info("workers_started", workers=count, pids=[w.pid for w in workers])
    code = 0
    running = {worker.pid: worker for worker in workers}
    while running:
        pid, status = os.wait()  # a forwarded signal interrupts it; Python retries (PEP 475)
        worker = running.pop(pid, None)
        if worker is None:
            continue
        worker.returncode = exit_code = os.waitstatus_to_exitcode(status)
        if not stopping:  # exited on its own: stop the rest and fail the whole
            log.error("worker_exited", pid=pid, exit_code=exit_code, detail="stopping the other workers")
            stopping = True
            code = exit_code if exit_code > 0 else 1
            for other in running.values():
                other.send_signal(signal.SIGTERM)
        elif code == 0 and exit_code != 0:
            code = exit_code if exit_code > 0 else 1
    ignore_late_signals()  # every worker is gone: the supervisor's own way out
    return code
