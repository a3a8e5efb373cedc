"""Figures 8 and 9: a 1 GiB upload and a 1 GiB download at line rate, through the gateway (default policies)
and through nginx as a streaming reverse proxy of the same upstreams, in the same rounds; the gateway's RSS
growth during each transfer.

The upstreams are never the bottleneck, and each direction has one for both proxies: an nginx of its own
sends a 1 GiB sparse file (sendfile, from the page cache) and bench/upstream.py's PUT /upload reads and
counts a body at a few GB/s; both are also measured direct, as the ceiling. curl is the client: it reads
the same file for the upload (Content-Length set) and discards the download.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from figures import curl, curl_rss
from peers import Peers, free_port, gateway_config

SIZE = 2**30
DIRECT = "upstream direct"
NGINX = "nginx reverse proxy"
GATEWAY = "bt-gateway default policies, limits.max_body_mb 2048"  # the default 512 refuses 1 GiB
VIAS = (DIRECT, NGINX, GATEWAY)
WAYS = ("upload", "download")


@dataclass(frozen=True)
class Transfer:
    mib_s: float
    rss_growth_mb: float | None  # the gateway's only


def _servers(files: int, data: Path, proxies: dict[str, int], upstreams: dict[str, int]) -> tuple[str, str]:
    """The http blocks of the upstream nginx (the file on `files`) and of the proxy nginx (one server a way).

    The proxy streams both ways as the gateway does: `proxy_request_buffering off` sends the upload on as
    it comes (buffering would spool 1 GiB to a temp file first), `proxy_buffering off` the download (with
    buffering, a client slower than the upstream would have nginx spool to disk up to 1 GiB). Its buffers
    are the gateway's 64 KiB chunks (nginx's defaults, one page, would hold it back)."""
    upstream = f"""
  server {{
    listen 127.0.0.1:{files};
    location /download {{ default_type application/octet-stream; alias {data}; }}
  }}"""
    proxy = ""
    for way, port in proxies.items():
        proxy += f"""
  upstream {way} {{ server 127.0.0.1:{upstreams[way]}; keepalive 8; }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 0;
    location / {{
      proxy_pass http://{way};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_request_buffering off;
      client_body_buffer_size 64k;
      proxy_buffering off;
      proxy_buffer_size 64k;
      proxy_buffers 4 64k;  # nginx checks proxy_busy_buffers_size (2 x 64k) against these, even unbuffered
    }}
  }}"""
    return upstream, proxy


def _check(what: str, status: int, size: int, answer: Path | None) -> None:
    """Every byte and a 200, and for an upload the upstream's own count of what it read."""
    counted = answer.read_text().strip() if answer is not None else str(SIZE)
    if status != 200 or size != SIZE or counted != str(SIZE):
        raise RuntimeError(f"{what}: status {status}, {size} bytes sent/received, upstream read {counted}")


def measure(tmp: Path, rounds: int) -> dict[tuple[str, str], list[Transfer]]:
    """(way, via) -> one Transfer per round; the three vias round-robin within each round."""
    shared = Path(tempfile.mkdtemp(prefix="bt-bench-1gib-"))  # not in `tmp` (0700): nginx's worker reads it
    shared.chmod(0o755)
    data = shared / "1gib.bin"
    with open(data, "wb") as f:
        f.truncate(SIZE)  # sparse: zeros read from the page cache, no disk
    data.chmod(0o644)
    answer = tmp / "answer.txt"
    peers = Peers(tmp)
    results: dict[tuple[str, str], list[Transfer]] = {
        (w, v): [] for w in WAYS for v in (DIRECT, NGINX, GATEWAY)
    }
    try:
        upstreams = {"upload": peers.python_upstream(), "download": free_port()}
        proxies = {way: free_port() for way in WAYS}
        upstream, proxy = _servers(upstreams["download"], data, proxies, upstreams)
        peers.nginx_http("nginx-upstream", upstream, [upstreams["download"]])
        peers.nginx_http("nginx-proxy", proxy, list(proxies.values()))
        gateways = {}
        for way in WAYS:
            config = gateway_config(free_port(), upstreams[way])
            config["limits"] = {"max_body_mb": 2048}
            gateways[way] = (peers.gateway(f"gw-{way}", config).pid, int(config["listen"]["port"]))
        ports = {DIRECT: upstreams, NGINX: proxies, GATEWAY: {w: port for w, (_, port) in gateways.items()}}

        def run(way: str, via: str) -> Transfer:
            url = f"http://127.0.0.1:{ports[via][way]}/{way}"
            upload = data if way == "upload" else None
            out = answer if upload else None
            answer.unlink(missing_ok=True)
            growth = None
            if via == GATEWAY:
                seconds, growth, status, size = curl_rss(
                    gateways[way][0], url, str(out or "/dev/null"), upload
                )
            else:
                seconds, status, size = curl(url, str(out or "/dev/null"), upload)
            _check(f"1 GiB {way}, {via}", status, size, out)
            return Transfer(SIZE / 2**20 / seconds, growth)

        for way in WAYS:  # warm-up: the file into the page cache; the gateways start fresh (RSS growth)
            run(way, DIRECT)
        for r in range(rounds):  # round-robin, starting one further each round
            for way in WAYS:
                for via in VIAS[r % 3 :] + VIAS[: r % 3]:
                    results[way, via].append(run(way, via))
    finally:
        peers.close()
        shutil.rmtree(shared, ignore_errors=True)
    return results
