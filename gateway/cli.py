"""Command line: `serve`, `check-config`, `probe`, `explain`, `hash-password`, `egress-lock`, `--version`.

Config problems exit 2 with one line each and no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import getpass
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from gateway import __version__, hangup, open_files
from gateway.config.load import DEFAULT_PATHS, DEFAULTS, ConfigError, LoadedConfig, config_path, load_config
from gateway.config.overrides import Override, flag
from gateway.config.redact import redacted
from gateway.logs import configure, get_logger
from gateway.watch import ConfigWatch, baseline
from gateway.workers import SIGNALS, ignore_late_signals, supervise, worker_index

EXIT_CONFIG = 2

# (option, config key path, type): CLI flags that override single keys (highest precedence).
_FLAGS: tuple[tuple[str, tuple[str, ...], type], ...] = (
    ("--listen-host", ("listen", "host"), str),
    ("--listen-port", ("listen", "port"), int),
    ("--admin-host", ("admin", "host"), str),
    ("--admin-port", ("admin", "port"), int),
    ("--log-level", ("logging", "level"), str),
    ("--log-format", ("logging", "format"), str),
    ("--outbound-rate-limit-max-requests", ("rate_limit", "max_requests"), int),
    ("--outbound-rate-limit-window-minutes", ("rate_limit", "window_minutes"), float),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bt-gateway", description="Egress gateway for Braintrust SDK traffic."
    )
    parser.add_argument("--version", action="version", version=f"bt-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    subs = {}
    for name, text in (
        ("serve", "run the gateway"),
        ("check-config", "validate and print the effective config"),
        ("probe", "health check: ask the admin listener from outside (exit 0 healthy, 1 not)"),
    ):
        subs[name] = sub = commands.add_parser(name, help=text)
        sub.add_argument(
            "-c",
            "--config",
            help="YAML file (default: $BT_GATEWAY_CONFIG, config/gateway.yaml, /etc/bt-gateway/gateway.yaml)",
        )
        for option, _, kind in _FLAGS:
            sub.add_argument(option, type=kind, default=None)
        if name == "serve":
            sub.add_argument(
                "--watch",
                action="store_true",
                help="reload when the config file's content changes (edits, renames, ConfigMap updates)",
            )
    subs["probe"].add_argument("--ready", action="store_true", help="ask /readyz instead of /healthz")
    hasher = commands.add_parser("hash-password", help="print a scrypt hash for forward_proxy.auth.users")
    hasher.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    _egress_lock_parser(commands)
    _explain_parser(commands)
    return parser


def _explain_parser(commands: Any) -> None:
    sub = commands.add_parser(
        "explain",
        help="what the gateway would do with a request: each step's verdict, the route, the upstream "
        "(exit 0 forwarded, 1 refused, 2 config error)",
    )
    sub.add_argument("-c", "--config", help="YAML file (found as for serve)")
    tokens = sub.add_mutually_exclusive_group()
    tokens.add_argument("--token", help="the caller's token (default: $BRAINTRUST_API_KEY)")
    tokens.add_argument("--no-token", action="store_true", help="ask as a caller without a token")
    sub.add_argument("-X", "--request", dest="method", metavar="METHOD", help="default GET")
    sub.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'")
    sub.add_argument("--client-ip", default="127.0.0.1", help="the caller's address (default 127.0.0.1)")
    sub.add_argument("--no-resolve", action="store_true", help="do not resolve the upstream's name")
    sub.add_argument("--json", action="store_true", help="one JSON document (see the README for its shape)")
    sub.add_argument("--cases", metavar="FILE", help="a YAML list of requests and expected outcomes")
    sub.add_argument("url", nargs="*", metavar="URL", help="/path, http(s)://host/path or CONNECT host:port")


LOCK_HELP = """\
Install iptables and ip6tables rules in this network namespace (the pod's: run it in an init container
with CAP_NET_ADMIN, before the gateway) so that only the gateway's UID reaches the outside. Always open:
loopback, packets of established connections (replies to what the pod serves), IPv6 neighbour discovery,
and the --allow destinations. Every other packet is rejected (TCP reset, ICMP port unreachable). The rules
live in one chain, BT-GATEWAY-EGRESS, jumped to first from OUTPUT; running it again replaces them.

--allow (repeatable, IPv4 and IPv6; a port opens TCP and UDP, no port opens everything):
  10.0.0.0/8            a network          10.96.0.10:53  a host and port (DNS)
  10.96.0.0/12:443      a network and port fd00::/8       an IPv6 network
  [fd00:10:96::a]:53    IPv6 with a port goes in brackets
"""


def _egress_lock_parser(commands: Any) -> None:
    lock = commands.add_parser(
        "egress-lock",
        help="pod firewall: only the gateway's UID may leave the pod (init container, needs NET_ADMIN)",
        description=LOCK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lock.add_argument(
        "--gateway-uid",
        type=int,
        default=10001,
        help="the UID the gateway runs as (default: 10001, the image's USER)",
    )
    lock.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="CIDR[:PORT]",
        help="a destination the app may reach directly",
    )
    lock.add_argument("--dry-run", action="store_true", help="print the rules instead of installing them")


def _egress_lock(args: argparse.Namespace) -> int:
    """Usage errors exit 2, a lock that cannot be installed exits 1: each with one line saying why."""
    from gateway.egress_apply import LockError, dry_run, install
    from gateway.egress_lock import LockSpec, parse_allow, summary

    if not 0 < args.gateway_uid < 2**32 - 1:
        uid = args.gateway_uid
        return _config_errors(
            [f"bt-gateway egress-lock: --gateway-uid {uid}: a UID from 1 up (0 would exempt root)"]
        )
    try:
        spec = LockSpec(args.gateway_uid, tuple(parse_allow(text) for text in args.allow))
    except ValueError as exc:
        return _config_errors([f"bt-gateway egress-lock: --allow {exc}"])
    if args.dry_run:
        print(dry_run(spec), end="")
        return 0
    try:
        counts = install(spec)
    except LockError as exc:
        print(f"bt-gateway egress-lock: {exc}", file=sys.stderr)
        return 1
    print(summary(spec, counts))
    return 0


def _hash_password(args: argparse.Namespace) -> int:
    """Prompt (or read stdin) and print the hash; the password itself is never echoed or logged."""
    from gateway.policy.proxyauth import hash_password

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if password != getpass.getpass("again: "):
            print("bt-gateway: passwords differ", file=sys.stderr)
            return EXIT_CONFIG
    if not password:
        print("bt-gateway: empty password", file=sys.stderr)
        return EXIT_CONFIG
    print(hash_password(password))
    return 0


def _flags(args: argparse.Namespace) -> tuple[Override, ...]:
    found = []
    for option, key, _ in _FLAGS:
        value = getattr(args, option.lstrip("-").replace("-", "_"), None)  # explain takes none
        if value is not None:
            found.append(flag(option, value, *key))
    return tuple(found)


def _load(args: argparse.Namespace) -> LoadedConfig:
    path = config_path(args.config, os.environ)
    return load_config(path, os.environ, _flags(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "serve":  # only serve acts on SIGHUP (gateway/hangup.py); the others die of it
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if args.command == "hash-password":
        return _hash_password(args)
    if args.command == "egress-lock":
        return _egress_lock(args)
    baseline = _watch_baseline(args)  # before the load: an edit during it is then reloaded
    try:
        loaded = _load(args)
    except ConfigError as exc:
        return _config_errors(exc.problems)
    if args.command == "check-config":
        return check_config(loaded)
    if args.command == "probe":
        return _probe(loaded, args.ready)
    if args.command == "explain":
        return _explain(loaded, args)
    if args.watch and loaded.path is None:
        return _config_errors([f"--watch: there is no config file to watch ({DEFAULTS} are in use)"])
    if loaded.config.workers > 1 and worker_index() is None:  # each worker gets --watch with argv
        return _supervise(loaded, list(sys.argv[1:] if argv is None else argv))
    return serve(loaded, _flags(args), watch=args.watch, baseline=baseline)


def _watch_baseline(args: argparse.Namespace) -> bytes | None:
    """For `serve --watch`: the digest of the config file as it is before it is loaded, if readable."""
    if args.command != "serve" or not args.watch:
        return None
    path = config_path(args.config, os.environ)
    return None if path is None else baseline(path)


def _probe(loaded: LoadedConfig, ready: bool) -> int:
    """The image's HEALTHCHECK: silent when healthy, one line saying why when not."""
    from gateway.probe import probe

    problem = probe(loaded.config.admin, "/readyz" if ready else "/healthz")
    if problem is None:
        return 0
    print(f"bt-gateway: {problem}", file=sys.stderr)
    return 1


def _explain(loaded: LoadedConfig, args: argparse.Namespace) -> int:
    """One request (text or `--json`), or every case of `--cases` (mismatches, one line each)."""
    from gateway.explain import ExplainUsageError, exit_code, explain_all, explain_request
    from gateway.explain_cases import CasesError, load_cases, mismatches
    from gateway.explain_text import render_text
    from gateway.generation import BuildError

    cases = []
    try:
        if args.cases is not None:
            given = args.url or args.token or args.no_token or args.method or args.header or args.json
            if given:
                raise ExplainUsageError("--cases FILE takes every request from the file: give no URL or flag")
            cases = load_cases(Path(args.cases))
            requests = [case.request for case in cases]
        else:
            named = any(h.partition(":")[0].strip().lower() == "authorization" for h in args.header)
            token = None if args.no_token or named else args.token or os.environ.get("BRAINTRUST_API_KEY")
            resolve = not args.no_resolve
            requests = [
                explain_request(
                    args.url,
                    method=args.method,
                    token=token,
                    headers=args.header,
                    client_ip=args.client_ip,
                    resolve=resolve,
                )
            ]
    except (ExplainUsageError, CasesError) as exc:
        problems = exc.problems if isinstance(exc, CasesError) else [f"bt-gateway explain: {exc}"]
        return _config_errors(problems)
    try:
        reports = _event_loop_runner()(explain_all(loaded.config, requests))
    except BuildError as exc:
        return _config_errors([loaded.problem(exc.key, exc.message)])
    if args.cases is not None:
        wrong = mismatches(Path(args.cases), cases, reports)
        print("\n".join([*wrong, f"{len(cases)} cases, {len(wrong) or 'no'} mismatches"]))
        return 1 if wrong else 0
    report = reports[0]
    print(json.dumps(report, indent=2) if args.json else render_text(report), end="\n" if args.json else "")
    return exit_code(report)


def _config_errors(problems: list[str]) -> int:
    for problem in problems:
        print(problem, file=sys.stderr)
    return EXIT_CONFIG


def _event_loop_runner() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # non-Linux: the stdlib loop is fine
        return asyncio.run


def check_config(loaded: LoadedConfig) -> int:
    """Build everything `serve` would (but the listeners), print the effective config, say what was read."""
    problems, warnings = _event_loop_runner()(_build_and_close(loaded))
    if problems:
        return _config_errors(problems)
    for warning in warnings:
        print(warning, file=sys.stderr)
    print(yaml.safe_dump(redacted(loaded.config), sort_keys=False), end="")
    if loaded.path is None:
        looked = " or ".join(str(p) for p in DEFAULT_PATHS)
        print(
            f"config ok: {DEFAULTS} (no -c FILE or $BT_GATEWAY_CONFIG, and no file at {looked})",
            file=sys.stderr,
        )
    else:
        print(f"config ok: {loaded.path}", file=sys.stderr)
    return 0


async def _build_and_close(loaded: LoadedConfig) -> tuple[list[str], list[str]]:
    """(problems, warnings): the generation `serve` would build, and the warnings it would log, as the
    lines check-config prints (`warning: WHERE: key: message`)."""
    from gateway.generation import BuildError, Generation

    try:
        generation = await Generation.build(loaded.config)
    except BuildError as exc:
        return [loaded.problem(exc.key, exc.message)], []
    warnings = [f"warning: {loaded.problem(n.key, n.message)}" for n in generation.warnings()]
    await generation.close()
    return [], warnings


def _supervise(loaded: LoadedConfig, argv: list[str]) -> int:
    """`workers: N`: check the config once here (one error, not N), then run N `serve` processes."""
    configure(loaded.config.logging.level, loaded.config.logging.format)
    problems, _ = _event_loop_runner()(_build_and_close(loaded))  # each worker logs the warnings
    if problems:
        return _config_errors(problems)
    return supervise(loaded.config.workers, argv)


GC_YOUNG_THRESHOLD = 20_000  # CPython's default is 700


def _tune_gc() -> None:
    """Run once the gateway is up: what start-up built (modules, config, generation) lives as long as the
    process, so it is frozen out of every collection, and the youngest generation is collected every
    20,000 net allocations instead of 700. Under load the default collector cost about 9 us a request
    (218 young collections, each walking every in-flight request's objects, in 22k requests) and stalled
    the loop for tens of ms on a full collection; reference counting frees almost everything anyway.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def serve(
    loaded: LoadedConfig,
    flags: tuple[Override, ...] = (),
    watch: bool = False,
    baseline: bytes | None = None,
) -> int:
    """Run until SIGTERM/SIGINT, then drain (`shutdown_delay_s`, then `shutdown_timeout_s`) and exit 0.

    `watch`: also reload when the config file's content changes (gateway/watch.py), not only on SIGHUP;
    `baseline` is the file's digest read before `loaded` was.
    """
    config = loaded.config
    configure(config.logging.level, config.logging.format)
    code: int = _event_loop_runner()(_serve(loaded, flags, watch, baseline))
    ignore_late_signals()  # again: closing asyncio's own loop (not uvloop) restored the defaults
    return code


async def _serve(
    loaded: LoadedConfig, flags: tuple[Override, ...], watch: bool = False, baseline: bytes | None = None
) -> int:
    """Serve until a stop signal; SIGHUP (and with `watch`, a changed file) reloads the config.

    The config is re-read with the same flags. The watcher stops before the drain: no reload starts then.
    """
    from gateway.generation import BuildError
    from gateway.listeners import StartupError
    from gateway.server import Gateway

    log = get_logger("gateway.cli")
    limits = loaded.config.limits
    want = open_files.needed(limits)
    if (have := open_files.raise_soft_limit(want)) < want:
        log.warning(
            "open_files_limit",
            limit=have,
            needed=want,
            detail=(
                f"the system caps open files at {have}, below the {want} that max_client_connections "
                f"({limits.max_client_connections}) and max_connections ({limits.max_connections}) can "
                "use: connections past it fail (EMFILE) instead of a 503; raise the hard limit "
                "(ulimit -Hn, systemd LimitNOFILE=, docker/podman --ulimit nofile=) or lower the bounds"
            ),
        )
    loop = asyncio.get_running_loop()
    source = lambda: load_config(loaded.path, os.environ, flags)  # noqa: E731
    gateway = Gateway(loaded.config, source=source, worker=worker_index() or 0)
    stop, hurry = asyncio.Event(), asyncio.Event()
    reloads: set[asyncio.Task[Any]] = set()

    def on_stop() -> None:
        """The first signal starts a graceful stop; a second one cuts `shutdown_delay_s` short."""
        (hurry if stop.is_set() else stop).set()

    async def reload() -> None:
        """SIGHUP: reload; a new generation opens its audit file afresh, else reopen it (log rotation)."""
        if not (await gateway.reload()).ok:
            gateway.reopen_logs()

    held = False  # a SIGHUP before the gateway serves: one reload once it does (gateway/hangup.py)

    def on_reload() -> None:
        nonlocal held
        if not gateway.started:
            held = True
            return
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in SIGNALS:
        loop.add_signal_handler(sig, on_reload if sig == signal.SIGHUP else on_stop)
    held = hangup.take()  # what came before the loop's handler
    try:
        await gateway.start(loaded.origin)
    except BuildError as exc:
        await gateway.stop()
        return _config_errors([loaded.problem(exc.key, exc.message)])
    except StartupError as exc:
        await gateway.stop()
        log.error("startup_failed", error=str(exc), config=loaded.origin)
        return 1
    if held:
        log.info("reload_held_during_startup", detail="a SIGHUP came while starting: reloading now")
        on_reload()
    watcher = None
    if watch and loaded.path is not None:
        watcher = ConfigWatch(loaded.path, gateway.reload, on_check=gateway.metrics.watch_checks.inc)
        watcher.start(baseline)
    _tune_gc()
    await stop.wait()
    if watcher is not None:
        await watcher.stop()
    gateway.drain()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hurry.wait(), gateway.config.shutdown_delay_s)  # as last reloaded
    await gateway.stop()
    ignore_late_signals()
    return 0


if __name__ == "__main__":
    sys.exit(main())
