"""Reload: re-read the config, build a new generation and swap it in, or keep the old one and say why.

One `Reloader` per gateway. SIGHUP, `POST /reload` and `serve --watch` all come here through
`Gateway.reload()`, so they follow the same rules: the config is validated and built exactly as
`check-config` does, a good one replaces the whole generation, a bad one changes nothing and each of its
problems is logged as one `config_reload_problem` line (the text `check-config` prints).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from gateway.config.load import ConfigError, LoadedConfig, format_key
from gateway.config.model import GatewayConfig
from gateway.config.redact import config_sha256
from gateway.generation import BuildError, Generation
from gateway.logs import get_logger
from gateway.metrics import Metrics

log = get_logger("gateway.reload")

ConfigSource = Callable[[], LoadedConfig]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did: `origin` is the file read (or empty), `problems` the lines that refused it.

    `restart_needed`: a reload that applied, but for these settings (one line each): they keep their
    value from start-up until the process restarts.
    """

    ok: bool
    origin: str
    problems: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()


class Live(Protocol):
    """The side of the gateway a reload touches: the generation serving now, and the swap to a new one."""

    @property
    def generation(self) -> Generation | None: ...

    @property
    def bound(self) -> GatewayConfig:
        """The config the process started with: what it bound once (listeners, workers) comes from it."""
        ...

    @property
    def stopping(self) -> bool: ...

    def swap(self, fresh: Generation) -> Generation:
        """Serve new requests on `fresh`; return the generation it replaced (retired, not yet closed)."""
        ...


class Coalesced(Generic[T]):
    """Runs `job` at most once at a time with at most one run waiting; a caller who asks while one waits
    shares that run's result.

    The waiting run starts when the running one ends, so it reads the config as it is then: a flood of
    reloads (a SIGHUP per write, a script in a loop) builds two generations, not one per signal.
    """

    def __init__(self, job: Callable[[], Awaitable[T]]) -> None:
        self._job = job
        self._running: asyncio.Task[T] | None = None
        self._waiting: asyncio.Task[T] | None = None

    async def __call__(self) -> T:
        if self._waiting is None:
            self._waiting = asyncio.get_running_loop().create_task(self._after(self._running))
        return await asyncio.shield(self._waiting)  # a caller that leaves does not cancel the others'

    async def _after(self, running: asyncio.Task[T] | None) -> T:
        if running is not None:
            await asyncio.wait((running,))
        self._running, self._waiting = self._waiting, None  # from here on, a caller waits for the next
        return await self._job()


class Reloader:
    """Builds and swaps in a reloaded config, and counts reloads; the gateway owns one and runs it
    through `Coalesced`, so one reload runs at a time."""

    def __init__(self, live: Live, source: ConfigSource | None, metrics: Metrics) -> None:
        """`source` re-reads the config (file, env, flags); without one every reload is refused."""
        self._live = live
        self._source = source
        self._metrics = metrics

    async def reload(self) -> ReloadResult:
        """Re-read and rebuild the config, exactly as `check-config` would; on any problem keep serving."""
        current = self._live.generation
        if current is None or self._live.stopping:
            return self._failed("", ["the gateway is stopping"])
        if self._source is None:
            return self._failed("", ["this gateway has no config source to reload from"])
        try:
            loaded = self._source()
        except ConfigError as exc:
            return self._failed("", exc.problems)
        config, restart = bound_at_start(self._live.bound, current.config, loaded)
        try:
            fresh = await Generation.build(config, current, self._metrics)
        except BuildError as exc:
            return self._failed(loaded.origin, [loaded.problem(exc.key, exc.message)])
        if self._live.stopping or self._live.generation is None:  # the stop began while it was built
            await fresh.close()
            return self._failed(loaded.origin, ["the gateway is stopping"])
        previous = self._live.swap(fresh)
        self._metrics.reloads.labels(result="success").inc()
        self._metrics.config_loaded(config_sha256(config))
        for line in restart:
            log.warning("config_restart_needed", problem=line)
        log.info(
            "config_reloaded",
            config=loaded.origin,
            in_flight_on_previous=previous.in_flight,
            restart_needed=len(restart),
        )
        log_warnings(fresh)
        return ReloadResult(True, loaded.origin, restart_needed=tuple(restart))

    def _failed(self, origin: str, problems: list[str]) -> ReloadResult:
        for problem in problems:
            log.error("config_reload_problem", problem=problem)
        log.error("config_reload_failed", config=origin or None, problems=len(problems))
        self._metrics.reload_refused()
        return ReloadResult(False, origin, tuple(problems))


def log_warnings(generation: Generation) -> None:
    """What an operator should know about a config, logged when it starts serving (start or reload)."""
    for notice in generation.warnings():
        log.warning(notice.event, key=format_key(notice.key), detail=notice.message, **notice.fields)


RESTART = "changing it needs a restart ({}); the rest of the config was reloaded"
TLS_RESTART = "turning TLS {} needs a restart; the rest of the config was reloaded"


def bound_at_start(
    bound: GatewayConfig, running: GatewayConfig, loaded: LoadedConfig
) -> tuple[GatewayConfig, list[str]]:
    """The config a reload applies, and one line for each setting in it that only a restart applies.

    What is fixed when the process starts: the listeners' addresses (bound once), TLS on or off, the
    number of workers, and with TLS the handshake bound (`limits.header_timeout_s`: asyncio fixes it per
    listener). The first three keep their start-up values in the config applied, so the running config
    says what runs and the next reload still reports them; the head bound of `header_timeout_s` does
    apply. Everything else, keep-alive and header limits included, applies to new connections at once.
    """
    config, lines = loaded.config, []
    if bound.workers != config.workers:
        lines.append(
            loaded.problem(
                ("workers",), RESTART.format(f"running {bound.workers}, asked for {config.workers}")
            )
        )
    listen, admin = config.listen, config.admin
    for key, before, after in (("listen", bound.listen, listen), ("admin", bound.admin, admin)):
        if (before.host, before.port) != (after.host, after.port):  # admin.token may change: it applies
            where = f"running on {before.host}:{before.port}, asked for {after.host}:{after.port}"
            lines.append(loaded.problem((key,), RESTART.format(where)))
    tls_before, tls_after = bound.listen.tls is not None, listen.tls is not None
    if tls_before != tls_after:
        lines.append(loaded.problem(("listen", "tls"), TLS_RESTART.format("on" if tls_after else "off")))
        listen = listen.model_copy(update={"tls": running.listen.tls})  # its files as last reloaded
    handshake_before, handshake_after = bound.limits.header_timeout_s, config.limits.header_timeout_s
    if tls_before and handshake_before != handshake_after:
        where = (
            f"the TLS handshake bound stays {handshake_before:g} s; "
            f"the request-head bound is {handshake_after:g} s"
        )
        lines.append(loaded.problem(("limits", "header_timeout_s"), RESTART.format(where)))
    listen = listen.model_copy(update={"host": bound.listen.host, "port": bound.listen.port})
    admin = admin.model_copy(update={"host": bound.admin.host, "port": bound.admin.port})
    return config.model_copy(update={"listen": listen, "admin": admin, "workers": bound.workers}), lines
