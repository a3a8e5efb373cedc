"""The processes a benchmark run talks to, all on 127.0.0.1: nginx (a static upstream and a reverse proxy of
it), bt-gateway, the Python upstream (bench/upstream.py) and redis-server.

Each child starts in its own process group, with its output in the run's temporary folder; `Peers.close()`
(called in `finally`) stops every one of them: SIGTERM to its group, SIGKILL after 10 s.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_URL = "https://public.example.com"
TOKEN = "Bearer bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 60) -> None:
    """Polls until something accepts on `port`; fails at once if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"{name}: nothing listens on {port} after {timeout:.0f} s")


def small_body(upstream_port: int) -> str:
    """~300 bytes of JSON holding the upstream's URL, so a rewriting gateway has work on every response."""
    base = f"http://127.0.0.1:{upstream_port}"
    doc = {
        "id": "proj_0123456789abcdef",
        "name": "bench",
        "api_url": base,
        "self": f"{base}/v1/project/proj_0123456789abcdef",
        "rows": list(range(30)),
    }
    return json.dumps(doc)


def gateway_config(
    port: int,
    upstream_port: int,
    *,
    rewrite: bool = True,
    body_paths: list[str] | None = None,
    storage: str = "memory://",
    workers: int | None = None,
) -> dict[str, Any]:
    rewrite_section: dict[str, Any] = {"enabled": rewrite}
    if body_paths is not None:
        rewrite_section["body_paths"] = body_paths
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "public_url": PUBLIC_URL,
        "allowlist": [f"127.0.0.1:{upstream_port}"],
        "routes": [{"name": "app", "prefix": "/", "upstream": f"http://127.0.0.1:{upstream_port}"}],
        "rate_limit": {"max_requests": 1_000_000, "window_minutes": 1, "storage": storage},
        "rewrite": rewrite_section,
        "logging": {"level": "warning"},
    }
    if workers is not None:
        config["workers"] = workers
    return config


class Peers:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def nginx(self, upstream_port: int, proxy_port: int, body: str) -> None:
        """nginx serving `body` on upstream_port, and proxying proxy_port to it with keep-alive."""
        prefix = self.tmp / "nginx"
        prefix.mkdir(exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(
            f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}; proxy_temp_path {prefix}; fastcgi_temp_path {prefix};
  uwsgi_temp_path {prefix}; scgi_temp_path {prefix};
  upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{upstream_port};
    location / {{ default_type application/json; return 200 '{body}'; }}
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
        proc = self.spawn("nginx", ["nginx", "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"])
        wait_port(upstream_port, proc, "nginx")
        wait_port(proxy_port, proc, "nginx")

    def redis(self) -> int:
        port = free_port()
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        proc = self.spawn("redis", [*args, "--appendonly", "no", "--dir", str(self.tmp)])
        wait_port(port, proc, "redis-server")
        return port

    def python_upstream(self) -> int:
        port = free_port()
        proc = self.spawn("upstream", [sys.executable, str(ROOT / "bench" / "upstream.py"), str(port)])
        wait_port(port, proc, "python upstream")
        return port

    def bare_proxy(self, port: int, upstream_port: int) -> subprocess.Popen[bytes]:
        """bench/bare_proxy.py on `port`, forwarding to `upstream_port`: the stack's ceiling."""
        script = str(ROOT / "bench" / "bare_proxy.py")
        proc = self.spawn("bare-proxy", [sys.executable, script, str(port), str(upstream_port)])
        wait_port(port, proc, "bare aiohttp proxy")
        return proc

    def write_config(self, name: str, config: dict[str, Any]) -> Path:
        path = self.tmp / f"{name}.yaml"
        path.write_text(json.dumps(config))  # JSON is valid YAML
        return path

    def config_ok(self, name: str, config: dict[str, Any]) -> bool:
        """`gateway check-config`: exit 0 valid, 2 not; anything else is a broken checkout: fail loudly."""
        path = self.write_config(name, config)
        args = [sys.executable, "-m", "gateway", "check-config", "-c", str(path)]
        done = subprocess.run(args, cwd=ROOT, capture_output=True, check=False, timeout=60)
        if done.returncode not in (0, 2):
            raise RuntimeError(f"check-config exited {done.returncode}: {done.stderr.decode()[-2000:]}")
        return done.returncode == 0

    def gateway(self, name: str, config: dict[str, Any]) -> subprocess.Popen[bytes]:
        path = self.write_config(name, config)
        proc = self.spawn(name, [sys.executable, "-m", "gateway", "serve", "-c", str(path)])
        try:
            wait_port(int(config["listen"]["port"]), proc, name)
        except RuntimeError as exc:
            log = (self.tmp / f"{name}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{exc}\n{log}") from None
        return proc
