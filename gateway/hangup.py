"""SIGHUP from the process's first moment: held until the gateway serves, then one reload.

Python leaves SIGHUP at its default action, death, until something handles it, and the event loop's
handler comes only after the slow part of start-up (imports, the config, the first generation): a
SIGHUP then, from an operator or a config reloader reacting to an edit, killed the process (exit 129).
The console script and `python -m gateway` call `hold()` before importing anything else; a SIGHUP that
comes before the gateway serves is remembered, and `serve` reloads once when it is ready, since the file
may have changed after it was read. A SIGHUP that reaches the interpreter before it runs this module is
beyond any Python code; the workers supervisor closes that window for its workers (gateway/workers.py).
"""

from __future__ import annotations

import signal
from types import FrameType

_asked: set[int] = set()  # the signals seen since the last `take()` (SIGHUP only)


def _remember(signum: int, _frame: FrameType | None) -> None:
    _asked.add(signum)


def hold() -> None:
    """From now on a SIGHUP is remembered instead of killing the process."""
    signal.signal(signal.SIGHUP, _remember)


def take() -> bool:
    """Whether a SIGHUP came since `hold()` (or the last `take()`); the next call says no again."""
    asked = bool(_asked)
    _asked.clear()
    return asked
