"""`make try`: the real gateway in front of a stand-in Braintrust, to try the SDKs offline, with no account.

    python -m tests.try_offline [--port 8080]

Starts tests/fake_braintrust.py (both planes, in memory, on 127.0.0.1) and `bt-gateway serve` on a config
written to a temporary directory: config/gateway.yaml with the `app` route on the fake's control plane and
the advertised `data` route on its data plane (`FakeBraintrust.gateway_config`, as the tests lay it out),
listening on 127.0.0.1 only. Prints the `export NAME=value` lines first, then `#` hints and one command
per SDK to try (the output reads as a shell script); the gateway's JSON log goes to stderr. SIGINT (Ctrl-C)
or SIGTERM stops the gateway, then the fake; the exit code is 0 when the gateway stopped cleanly, else 1.

It lives with the tests, not in `gateway/`, because the stand-in is the tests' fake: one module for both,
and the package ships no test double. It needs only the runtime install (`make run`'s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import yaml

from gateway.config.overrides import ENV_OVERRIDES
from tests.fake_braintrust import FakeBraintrust
from tests.gateway_process import GatewayProcess

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = ROOT / "config" / "gateway.yaml"
API_KEY = "sk-try-offline"  # the only key the stand-in accepts
ROUTE_KEYS = {"name", "prefix", "upstream", "advertise"}  # what gateway_config() sets on a route itself

PYTHON_TRY = (
    'python3 -c \'import braintrust; e = braintrust.init(project="offline"); '
    'e.log(input="hi", output="hello", scores={"ok": 1}); print(e.summarize())\''
)
NODE_TRY = (
    'node --input-type=module -e \'import { init } from "braintrust"; const e = init("offline"); '
    'e.log({ input: "hi", output: "hello", scores: { ok: 1 } }); console.log(await e.summarize())\''
)


def gateway_config(fake: FakeBraintrust, port: int) -> dict[str, Any]:
    """The shipped config, pointed at the fake: its routes and allow-list, links to its webapp page."""
    shipped: dict[str, Any] = yaml.safe_load(SHIPPED_CONFIG.read_text())
    data_route = next(route for route in shipped["routes"] if route["name"] == "data")
    return {
        **shipped,
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": 0},
        "public_url": fake.control_url,
        **fake.gateway_config(**{k: v for k, v in data_route.items() if k not in ROUTE_KEYS}),
    }


def banner(gateway: GatewayProcess, fake: FakeBraintrust) -> str:
    """The `export` lines first (what a test or a script parses), then the hints."""
    return f"""\
export BRAINTRUST_APP_URL={gateway.url}
export BRAINTRUST_API_KEY={API_KEY}
# bt-gateway on {gateway.url} (admin http://127.0.0.1:{gateway.admin_port}/metrics) in front of a
# stand-in Braintrust in memory: control plane {fake.control_url}, data plane {fake.data_url}.
# In another shell, run the two export lines, then the Python SDK (pip install braintrust):
{PYTHON_TRY}
# or the TypeScript SDK, where `npm install braintrust` ran (tests/js after `make test`):
{NODE_TRY}
# The gateway's log follows on stderr. Ctrl-C stops the gateway and the stand-in."""


def received(fake: FakeBraintrust) -> str:
    """What the stand-in got, said once at the end (it keeps everything in memory only)."""
    rows = sum(len(rows) for rows in fake.store.objects.values())
    return (
        f"# The stand-in received {len(fake.control.requests)} control-plane and "
        f"{len(fake.data.requests)} data-plane requests and holds {rows} rows; all gone now."
    )


async def run(port: int, out: TextIO) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with FakeBraintrust(api_key=API_KEY) as fake:
        with tempfile.TemporaryDirectory(prefix="bt-gateway-try-") as tmp:
            config = gateway_config(fake, port)
            try:
                gateway = await asyncio.to_thread(
                    GatewayProcess, config, Path(tmp), echo=sys.stderr, new_session=True
                )
            except RuntimeError:
                print("# bt-gateway did not start (its log is above)", file=sys.stderr)
                return 1
            loop.run_in_executor(None, gateway.proc.wait).add_done_callback(lambda _: stop.set())
            print(banner(gateway, fake), file=out, flush=True)
            await stop.wait()
            code = await asyncio.to_thread(gateway.stop)
        print(received(fake), file=out, flush=True)
    if code != 0:
        print(f"# bt-gateway exited with {code}", file=sys.stderr)
    return 0 if code == 0 else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.try_offline", description="The gateway in front of a stand-in Braintrust."
    )
    parser.add_argument(
        "--port", type=int, default=8080, help="the gateway's port on 127.0.0.1 (0: any free one)"
    )
    args = parser.parse_args()
    # The gateway runs on the written config alone: a BRAINTRUST_APP_URL still exported from an earlier
    # `make try` would point its `app` route at itself.
    for name in ENV_OVERRIDES:
        os.environ.pop(name, None)
    sys.exit(asyncio.run(run(args.port, sys.stdout)))


if __name__ == "__main__":
    main()
