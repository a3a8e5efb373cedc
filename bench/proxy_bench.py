"""Reverse-proxy throughput: bt-gateway (every policy on) against nginx, measured in one run with wrk.

Topology, all on 127.0.0.1: wrk -> {nginx proxy | bt-gateway} -> nginx upstream (a fixed JSON body that
contains the app URL, so the rewriter has work to do). Prints requests/s and latency for each peer and
the ratio bt-gateway / nginx. Bounded: each run lasts DURATION seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DURATION = int(os.environ.get("BENCH_DURATION_S", "8"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
BODY = json.dumps({"url": "http://127.0.0.1/app/x", "rows": list(range(40))})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def nginx_conf(prefix: Path, upstream_port: int, proxy_port: int) -> Path:
    body = BODY.replace('"', '\\"')
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{upstream_port};
    location / {{ default_type application/json; return 200 "{body}"; }}
  }}
  server {{
    listen 127.0.0.1:{proxy_port};
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}
}}
"""
    )
    return conf


def wrk(port: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{DURATION}s",
            "--latency",
            "-H",
            "Authorization: Bearer bench-token",
            f"http://127.0.0.1:{port}/v1/bench",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=DURATION + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": _ms(p50),
        "p99_ms": _ms(p99),
        "errors": float(non2xx.group(1)) if non2xx else 0,
    }


def _ms(match: re.Match[str] | None) -> float:
    if match is None:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def gateway_config(tmp: Path, upstream_port: int, port: int) -> Path:
    config = tmp / "gateway.yaml"
    config.write_text(
        json.dumps(
            {
                "listen": {"host": "127.0.0.1", "port": port},
                "admin": {"host": "127.0.0.1", "port": free_port()},
                "public_url": "https://public.example.com",
                "allowlist": [f"127.0.0.1:{upstream_port}"],
                "routes": [{"name": "app", "prefix": "/", "upstream": f"http://127.0.0.1:{upstream_port}"}],
                # On for every request, but never refusing: a 1 s window keeps the moving window's
                # per-token timestamp list as short as a real 100/min limit would over a minute.
                "rate_limit": {"max_requests": 1_000_000, "window_minutes": 1 / 60},
                "logging": {"level": "warning"},
            }
        )
    )
    return config


def main() -> int:
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            print(f"proxy bench: {tool} is not installed (make bench installs it)", file=sys.stderr)
            return 1
    tmp = Path(tempfile.mkdtemp(prefix="bt-bench-"))
    upstream_port, proxy_port, gw_port = free_port(), free_port(), free_port()
    nginx = subprocess.Popen(
        ["nginx", "-c", str(nginx_conf(tmp, upstream_port, proxy_port)), "-p", str(tmp), "-g", "daemon off;"]
    )
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "-c", str(gateway_config(tmp, upstream_port, gw_port))],
        stdout=subprocess.DEVNULL,
    )
    try:
        for port in (upstream_port, proxy_port, gw_port):
            wait_port(port)
        results = {
            "upstream (direct)": wrk(upstream_port),
            "nginx proxy": wrk(proxy_port),
            "bt-gateway": wrk(gw_port),
        }
    finally:
        gateway.send_signal(signal.SIGTERM)
        nginx.send_signal(signal.SIGQUIT)
        gateway.wait(30)
        nginx.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"reverse-proxy throughput, wrk -t1 -c{CONNECTIONS} -d{DURATION}s, small JSON body, 127.0.0.1")
    print(f"{'peer':<20}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>10}")
    for name, r in results.items():
        print(f"{name:<20}{r['rps']:>10.0f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['errors']:>10.0f}")
    ratio = results["bt-gateway"]["rps"] / results["nginx proxy"]["rps"]
    print(f"ratio bt-gateway / nginx proxy: {ratio:.2f}x (target >= 0.30x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
