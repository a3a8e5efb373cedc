"""structlog set-up: JSON lines (or console) on stdout, with secrets scrubbed before any renderer sees them.

aiohttp's own stdlib log records go through the same processors, so a traceback from the framework is a
JSON line too, and is scrubbed the same way.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "api_key", "token"})
_SECRET_TEXT = re.compile(
    r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+|\b(sk-|bt-)[A-Za-z0-9._-]{8,}|(?<=://)[^/\s:@]+:[^/\s@]+@"
)
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_level = [logging.DEBUG]  # the configured level, for hot paths that would build an event for nothing


def info_enabled() -> bool:
    """Whether info events are written: the access event is built only when it will be."""
    return _level[0] <= logging.INFO


def scrub(value: str) -> str:
    """Replace anything that looks like a credential in free text (`Bearer x`, `sk-...`, `user:pw@`)."""
    return _SECRET_TEXT.sub("[redacted]", value)


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop credential-named fields and scrub strings; last line of defence."""
    for key in list(event):
        if key.lower() in _SECRET_KEYS:
            event[key] = "[redacted]"
        elif isinstance(event[key], str):
            event[key] = scrub(event[key])
    return event


def configure(level: str = "info", fmt: str = "json") -> None:
    """Install the processors for both structlog and stdlib logging; safe to call again on reload."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_secrets,
    ]
    _level[0] = _LEVELS[level]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),  # one write per line: workers share stdout
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared[1:]],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # we write our own access event
    # The Redis client logs each retry; a store outage is ours to report, once (policy/ratelimit.py).
    logging.getLogger("coredis").setLevel(logging.WARNING)


def get_logger(name: str) -> Any:
    """A structlog logger that stamps `logger=<name>` on every event."""
    return structlog.get_logger().bind(logger=name)
