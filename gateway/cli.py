"""Command line: `serve`, `check-config`, `--version`.

Config problems exit 2 with one line each and no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from gateway import __version__
from gateway.config.load import ConfigError, config_path, load_config
from gateway.config.model import GatewayConfig
from gateway.config.overrides import Override, flag
from gateway.config.redact import redacted
from gateway.logs import configure, get_logger

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
    for name, text in (
        ("serve", "run the gateway"),
        ("check-config", "validate and print the effective config"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument(
            "-c",
            "--config",
            help="YAML file (default: $BT_GATEWAY_CONFIG, config/gateway.yaml, /etc/bt-gateway/gateway.yaml)",
        )
        for option, _, kind in _FLAGS:
            sub.add_argument(option, type=kind, default=None)
    hasher = commands.add_parser("hash-password", help="print a scrypt hash for forward_proxy.auth.users")
    hasher.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    return parser


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
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value is not None:
            found.append(flag(option, value, *key))
    return tuple(found)


def _load(args: argparse.Namespace) -> GatewayConfig:
    path = config_path(args.config, os.environ)
    return load_config(path, os.environ, _flags(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "hash-password":
        return _hash_password(args)
    try:
        config = _load(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"bt-gateway: config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(yaml.safe_dump(redacted(config), sort_keys=False), end="")
        print("config ok", file=sys.stderr)
        return 0
    return serve(config)


def serve(config: GatewayConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain within `shutdown_timeout_s` and exit 0."""
    configure(config.logging.level, config.logging.format)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # non-Linux: the stdlib loop is fine
        runner = asyncio.run
    try:
        runner(_serve(config))
    except OSError as exc:
        get_logger("gateway.cli").error("startup_failed", error=str(exc))
        return 1
    return 0


async def _serve(config: GatewayConfig) -> None:
    from gateway.server import Gateway

    gateway = Gateway(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    await stop.wait()
    await gateway.stop()


if __name__ == "__main__":
    sys.exit(main())
