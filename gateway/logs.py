"""structlog set-up: JSON lines (or console) on stdout, with secrets scrubbed before any renderer sees them.

aiohttp's own stdlib log records go through the same processors, so a traceback from the framework is a
JSON line too, and is scrubbed the same way.

A signed URL is a credential: every request target, path or URL bound for a log goes through
`loggable_target` (no query, a relay token as its fingerprint), and free text that may quote one (an
exception's message) through `loggable_text`.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from gateway.policy.credentials import FINGERPRINT_HEX, token_digest

_SECRET_KEYS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "api_key", "token"})
_SECRET_TEXT = re.compile(
    r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+|\b(sk-|bt-)[A-Za-z0-9._-]{8,}|(?<=://)[^/\s:@]+:[^/\s@]+@"
)
# A relay link's marker anywhere in a path (`/_relay/`, `//_relay/`, `/data-plane/_relay/`, `%5Frelay%2F`):
# what follows it is the token.
_RELAY_MARK = re.compile(r"(?i)(?:_|%5f)relay(?:/|%2f)")
# URLs and relay paths inside free text, up to the quote or space that ends them.
_TARGETS = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s'\"<>]*|/(?:_|%5f)relay(?:/|%2f)[^\s'\"<>]*")
MAX_TARGET = 2048
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_level = [logging.DEBUG]  # the configured level, for hot paths that would build an event for nothing


def info_enabled() -> bool:
    """Whether info events are written: the access event is built only when it will be."""
    return _level[0] <= logging.INFO


def loggable_target(target: str) -> str:
    """A request target, path or URL as a log may show it: without query or fragment (where signatures and
    keys ride), a relay token only as its fingerprint, bounded."""
    path = target.partition("?")[0].partition("#")[0]
    mark = _RELAY_MARK.search(path) if "relay" in path.lower() else None  # most paths: no regex
    if mark is not None:
        path = path[: mark.end()] + token_digest(path[mark.end() :])[:FINGERPRINT_HEX]
    return path[:MAX_TARGET]


def loggable_text(text: str) -> str:
    """Free text (an exception's message) with every URL or relay path in it made `loggable_target`."""
    return _TARGETS.sub(lambda found: loggable_target(found.group()), text)


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
