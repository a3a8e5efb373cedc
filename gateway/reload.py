"""Reload: re-read the config, build a new generation and swap it in, or keep the old one and say why.

One `Reloader` per gateway. SIGHUP, `POST /reload` and `serve --watch` all come here through
`Gateway.reload()`, so they follow the same rules: the config is validated and built exactly as
`check-config` does, a good one replaces the whole generation, a bad one changes nothing and each of its
problems is logged as one `config_reload_problem` line (the text `check-config` prints).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.config.load import ConfigError, LoadedConfig, format_key
from gateway.config.model import GatewayConfig
from gateway.generation import BuildError, Generation
from gateway.logs import get_logger
from gateway.metrics import Metrics

log = get_logger("gateway.reload")

ConfigSource = Callable[[], LoadedConfig]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did: `origin` is the file read (or empty), `problems` the lines that refused it."""

    ok: bool
    origin: str
    problems: tuple[str, ...] = ()


class Live(Protocol):
    """The side of the gateway a reload touches: the generation serving now, and the swap to a new one."""

    @property
    def generation(self) -> Generation | None: ...

    @property
    def stopping(self) -> bool: ...

    def swap(self, fresh: Generation) -> Generation:
        """Serve new requests on `fresh`; return the generation it replaced (retired, not yet closed)."""
        ...


class Reloader:
    """Serialises reloads (one at a time) and counts them; the gateway owns one and delegates to it."""

    def __init__(self, live: Live, source: ConfigSource | None, metrics: Metrics) -> None:
        """`source` re-reads the config (file, env, flags); without one every reload is refused."""
        self._live = live
        self._source = source
        self._metrics = metrics
        self._lock = asyncio.Lock()

    async def reload(self) -> ReloadResult:
        """Re-read and rebuild the config, exactly as `check-config` would; on any problem keep serving."""
        async with self._lock:
            current = self._live.generation
            if self._source is None or current is None or self._live.stopping:
                return self._failed("", ["this gateway has no config source to reload from"])
            try:
                loaded = self._source()
            except ConfigError as exc:
                return self._failed("", exc.problems)
            problems = restart_needed(current.config, loaded)
            if problems:
                return self._failed(loaded.origin, problems)
            try:
                fresh = await Generation.build(loaded.config, current, self._metrics)
            except BuildError as exc:
                return self._failed(loaded.origin, [loaded.problem(exc.key, exc.message)])
            previous = self._live.swap(fresh)
            self._metrics.reloads.labels(result="success").inc()
            log.info("config_reloaded", config=loaded.origin, in_flight_on_previous=previous.in_flight)
            log_warnings(fresh)
            return ReloadResult(True, loaded.origin)

    def _failed(self, origin: str, problems: list[str]) -> ReloadResult:
        for problem in problems:
            log.error("config_reload_problem", problem=problem)
        log.error("config_reload_failed", config=origin or None, problems=len(problems))
        self._metrics.reloads.labels(result="failure").inc()
        return ReloadResult(False, origin, tuple(problems))


def log_warnings(generation: Generation) -> None:
    """What an operator should know about a config, logged when it starts serving (start or reload)."""
    for notice in generation.warnings():
        log.warning(notice.event, key=format_key(notice.key), detail=notice.message, **notice.fields)


def restart_needed(running: GatewayConfig, loaded: LoadedConfig) -> list[str]:
    """Listener addresses are bound once, and so is TLS on or off: a reload that changes one is refused,
    saying so. Other `listen.tls` changes (other files) are reloaded: gateway/listener_tls.py."""
    problems = []
    if running.workers != loaded.config.workers:
        problems.append(
            loaded.problem(
                ("workers",),
                f"changing it needs a restart (running {running.workers}, asked for "
                f"{loaded.config.workers}); nothing was reloaded",
            )
        )
    tls_before, tls_after = running.listen.tls is not None, loaded.config.listen.tls is not None
    if tls_before != tls_after:
        problems.append(
            loaded.problem(
                ("listen", "tls"),
                f"turning TLS {'on' if tls_after else 'off'} needs a restart; nothing was reloaded",
            )
        )
    for key in ("listen", "admin"):
        before, after = getattr(running, key), getattr(loaded.config, key)
        if (before.host, before.port) != (after.host, after.port):  # admin.token may change: it applies
            problems.append(
                loaded.problem(
                    (key,),
                    f"changing it needs a restart (running on {before.host}:{before.port}, "
                    f"asked for {after.host}:{after.port}); nothing was reloaded",
                )
            )
    return problems
