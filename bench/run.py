"""`make bench`: every figure of the gateway's performance targets, measured in one run, printed as one table
and written as JSON to bench/results/<UTC timestamp>.json.

Each figure is the median of BENCH_ROUNDS rounds (default 3) with the min-max; each wrk run lasts
BENCH_DURATION_S seconds (default 5). Ratios are taken between figures of this same run. Every process runs
on 127.0.0.1 and is stopped in `finally`. BENCH_ONLY=proxy,instructions (a comma list of the SECTIONS'
names) runs only those sections; all by default.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import operator
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's gateway package, not an installed one

import callgrind  # noqa: E402
import transfer  # noqa: E402
from figures import Stat, Wrk, codec_floor, curl, curl_rss, memory_cost, redis_cost, wrk  # noqa: E402
from idle import (  # noqa: E402
    CLIENTS,
    MAX_CLIENT_CONNECTIONS,
    SDK_FIELDS,
    TUNNELS,
    IdleRound,
    idle_gateway_config,
    idle_round,
    raise_nofile,
)
from peers import PUBLIC_URL, Peers, free_port, gateway_config, small_body  # noqa: E402

DURATION = int(os.environ.get("BENCH_DURATION_S", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
WORKERS_NA = "n/a (workers not available)"
BARE = "reference: bare aiohttp proxy, no policies"
DEFAULT = "bt-gateway default policies"
EVERY = 'bt-gateway body_paths ["/**"]'


@dataclass
class Row:
    figure: str
    measured: str
    target: str = ""
    met: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def show(stat: Stat, digits: int = 0, unit: str = "") -> str:
    return f"{stat.median:.{digits}f}{unit} [{stat.lo:.{digits}f}-{stat.hi:.{digits}f}]"


def met(ok: bool) -> str:
    return "yes" if ok else "no"


def row(figure: str, samples: list[float], digits: int, unit: str, **data: Any) -> Row:
    stat = Stat.of(samples)
    numbers = {"median": stat.median, "min": stat.lo, "max": stat.hi, "samples": samples}
    return Row(figure, show(stat, digits, unit), data={"unit": unit.strip(), **numbers, **data})


def ratio_row(
    figure: str,
    top: list[float],
    bottom: list[float],
    target: str = "",
    ok: Callable[[float], bool] | None = None,
) -> Row:
    """median(top) / median(bottom), with the range of the per-round ratios (same round, same conditions);
    a reference ratio has no target."""
    ratio = Stat.of(top).median / Stat.of(bottom).median
    rounds = [a / b for a, b in zip(top, bottom, strict=True)]
    measured = f"{ratio:.2f}x [{min(rounds):.2f}-{max(rounds):.2f}]"
    judged = met(ok(ratio)) if ok is not None else ""
    return Row(figure, measured, target, judged, {"ratio": ratio, "per_round": rounds})


def check_body(url: str, path: Path, want: str, unwanted: str) -> int:
    """Fetches `url` once and fails loudly unless its (decoded) body holds `want` and not `unwanted`."""
    _, status, _ = curl(url, out=str(path))
    raw = path.read_bytes()
    body = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if status != 200 or want.encode() not in body or unwanted.encode() in body:
        raise RuntimeError(f"{url}: status {status}; want {want!r}, not {unwanted!r}, in {body[:300]!r}")
    return len(body)


# Issue 23's floors for the gateway's throughput, as a share of the bare aiohttp proxy's in the same round.
BARE_TARGETS = {DEFAULT: 0.6, EVERY: 0.5}


def proxy_figures(tmp: Path) -> list[Row]:
    """Figures 1 and 2: wrk against nginx direct, nginx proxy and the gateways, round-robin in every round."""
    default, every, workers = DEFAULT, EVERY, "bt-gateway workers: 2, Redis"
    peers = Peers(tmp)
    try:
        up, proxy = free_port(), free_port()
        upstream_url = f"http://127.0.0.1:{up}"
        peers.nginx(up, proxy, small_body(up))
        redis = f"redis://127.0.0.1:{peers.redis()}/0"
        ports = {"upstream direct (nginx static)": up, "nginx reverse proxy": proxy, BARE: free_port()}
        peers.bare_proxy(ports[BARE], up)
        gateways = {
            default: gateway_config(free_port(), up),
            every: gateway_config(free_port(), up, body_paths=["/**"]),
            workers: gateway_config(free_port(), up, storage=redis, workers=2),
        }
        if not peers.config_ok("gw-workers-check", gateways[workers]):
            del gateways[workers]
        for i, (name, config) in enumerate(gateways.items()):
            peers.gateway(f"gw-{i}", config)
            ports[name] = int(config["listen"]["port"])
        url = "http://127.0.0.1:{}/v1/bench".format
        check_body(url(ports[every]), tmp / "every.json", PUBLIC_URL, upstream_url)  # rewritten
        check_body(url(ports[default]), tmp / "default.json", upstream_url, PUBLIC_URL)  # not on body_paths

        names = list(ports)
        for name in names:  # warm-up: connections, pools, caches
            wrk(ports[name], 64, 1)
        runs: dict[str, list[Wrk]] = {name: [] for name in names}
        for r in range(ROUNDS):  # round-robin, starting one further each round
            for name in names[r % len(names) :] + names[: r % len(names)]:
                runs[name].append(wrk(ports[name], 64, DURATION))
        lat_names = [*names[:3], default]  # direct, nginx, the bare proxy (the stack's floor), the gateway
        p99: dict[str, list[float]] = {name: [] for name in lat_names}
        for r in range(ROUNDS):
            for name in lat_names[r % len(lat_names) :] + lat_names[: r % len(lat_names)]:
                p99[name].append(wrk(ports[name], 4, DURATION).p99_ms)
    finally:
        peers.close()

    rows = []
    nginx = [w.rps for w in runs["nginx reverse proxy"]]
    bare = [w.rps for w in runs[BARE]]
    for name in names:
        rps = [w.rps for w in runs[name]]
        bad = sum(w.bad for w in runs[name])
        rows.append(row(f"1. req/s, {name}", rps, 0, "", bad_responses=bad))
        rows[-1].measured += f" ({bad} non-2xx/socket errors!)" if bad else ""
        if name == BARE:  # the stack's ceiling: what forwarding alone costs through aiohttp here
            rows.append(ratio_row("   ratio to nginx reverse proxy", rps, nginx))
        if name.startswith("bt-gateway"):  # issue 23: judged against the stack's ceiling, not nginx
            rows.append(ratio_row("   ratio to nginx reverse proxy", rps, nginx))
            floor = BARE_TARGETS.get(name)
            target, ok = (f">= {floor:.2f}x", partial(operator.le, floor)) if floor else ("", None)
            rows.append(ratio_row("   ratio to the bare aiohttp proxy", rps, bare, target, ok))
    if workers not in names:
        rows.append(Row(f"1. req/s, {workers}", WORKERS_NA))
    direct = p99[names[0]]
    rows.append(row("2. p99 at -c4, upstream direct", direct, 2, " ms"))
    for name in lat_names[1:]:
        added = [p - d for p, d in zip(p99[name], direct, strict=True)]
        rows.append(row(f"2. p99 added at -c4, {name}", added, 2, " ms", p99_ms=p99[name]))
    rows[-1].target, rows[-1].met = "<= 0.5 ms", met(Stat.of(added).median <= 0.5)
    return rows


def stream_figures(tmp: Path) -> list[Row]:
    """Figures 3 and 6: the Python upstream behind a rewriting gateway (/**) and a non-rewriting one."""
    peers = Peers(tmp)
    try:
        up = peers.python_upstream()
        upstream_url = f"http://127.0.0.1:{up}"
        on_port, off_port = free_port(), free_port()
        on = peers.gateway("gw-on", gateway_config(on_port, up, body_paths=["/**"]))
        peers.gateway("gw-off", gateway_config(off_port, up, rewrite=False))

        seconds, growth, status, size = curl_rss(on.pid, f"http://127.0.0.1:{on_port}/stream")
        if status != 200 or size != 2**30:
            raise RuntimeError(f"1 GiB download: status {status}, {size} bytes")

        on_url, off_url = (f"http://127.0.0.1:{port}/big.json" for port in (on_port, off_port))
        check_body(on_url, tmp / "on.gz", PUBLIC_URL, upstream_url)
        decoded = check_body(off_url, tmp / "off.gz", upstream_url, PUBLIC_URL)
        times: dict[str, list[float]] = {on_url: [], off_url: []}
        for _ in range(3):
            for url, samples in times.items():
                samples.append(curl(url)[0])
    finally:
        peers.close()
    return [
        Row(
            "3. 1 GiB download, gateway RSS growth",
            f"{growth:.1f} MB; {seconds:.1f} s, {2**30 / 2**20 / seconds:.0f} MiB/s (1 round)",
            "<= 64 MB",
            met(growth <= 64),
            {"rss_growth_mb": growth, "seconds": seconds},
        ),
        row(f"6. {decoded / 1e6:.0f} MB gzip JSON, rewrite on (/**)", times[on_url], 3, " s"),
        row(f"6. {decoded / 1e6:.0f} MB gzip JSON, rewrite off", times[off_url], 3, " s"),
        ratio_row("   ratio rewrite on / off", times[on_url], times[off_url], "<= 3x", lambda x: x <= 3),
        row("   reference: inflate + rewrite + deflate in-process", codec_floor(up, PUBLIC_URL), 3, " s"),
    ]


def limiter_figures(tmp: Path) -> list[Row]:
    """Figures 4 and 5: the rate limiter in this process, memory storage then a local Redis."""
    high: list[float] = []
    low: list[float] = []
    for _ in range(ROUNDS):
        high.append(asyncio.run(memory_cost(1_000_000, 200_000, 20_000))[0])
        low.append(asyncio.run(memory_cost(100, 0, 20_000))[0])
    rows = [
        row("4. limiter p50, memory, 1 token, 1M/min (200k in window)", high, 2, " µs"),
        row("4. limiter p50, memory, 1 token, 100/min (refusing)", low, 2, " µs"),
        ratio_row("   ratio 1M/min / 100/min", high, low, "<= 1.5x", lambda x: x <= 1.5),
    ]
    peers = Peers(tmp)
    try:
        port = peers.redis()
        results = [asyncio.run(redis_cost(port, 5_000, tmp / f"monitor-{r}.log")) for r in range(ROUNDS)]
    finally:
        peers.close()
    p50s, p99s, executed, trips, sent = (list(column) for column in zip(*results, strict=True))
    commands = ", ".join(f"{k} x{v}" for k, v in sent[-1].items())
    rows += [
        row("5. limiter p50, Redis, 5,000 decisions", p50s, 1, " µs"),
        row("5. limiter p99, Redis, 5,000 decisions", p99s, 1, " µs"),
        row("5. Redis round trips per decision (MONITOR)", trips, 2, "", sent=sent),
        row("   commands run per decision, Lua's included", executed, 2, ""),
    ]
    rows[-2].measured += f" ({commands} per 5,000 decisions)"
    rows[-1].measured += " (INFO stats total_commands_processed)"
    rows[-2].target, rows[-2].met = "1", met(max(trips) <= 1)
    return rows


def instruction_figures(tmp: Path) -> list[Row]:
    """Figure 7: instructions per request under callgrind (bench/callgrind.py), gateway and bare proxy."""
    counted = callgrind.measure(tmp, [callgrind.GATEWAY, callgrind.BARE])
    rows = []
    for name, c in counted.items():
        first, last = c.requests[0], c.requests[-1]
        rows.append(
            Row(
                f"7. instructions/request, {name}",
                f"{c.slope / 1e3:.0f}k (slope {first}->{last} requests; "
                f"{c.per_request / 1e3:.0f}k at {first})",
                data={
                    "slope": c.slope,
                    "per_request": c.per_request,
                    "requests": c.requests,
                    "instructions": c.instructions,
                },
            )
        )
    gateway, bare = counted[callgrind.GATEWAY], counted[callgrind.BARE]
    rows[0].target, rows[0].met = "<= 300k", met(gateway.slope <= 300_000)
    ratio = gateway.slope / bare.slope
    rows.append(Row("   ratio to the bare aiohttp proxy", f"{ratio:.2f}x", data={"ratio": ratio}))
    return rows


def transfer_figures(tmp: Path) -> list[Row]:
    """Figures 8 and 9: 1 GiB up and down through the gateway and nginx (bench/transfer.py)."""
    results = transfer.measure(tmp, ROUNDS)
    rows = []
    for number, way in zip((8, 9), transfer.WAYS, strict=True):
        speed = {via: [t.mib_s for t in results[way, via]] for via in transfer.VIAS}
        for via, samples in speed.items():
            rows.append(row(f"{number}. 1 GiB {way}, {via}", samples, 0, " MiB/s"))
        nginx, gateway = speed[transfer.NGINX], speed[transfer.GATEWAY]
        rows.append(ratio_row("   ratio gateway / nginx", gateway, nginx, ">= 0.50x", lambda x: x >= 0.5))
        growth = [t.rss_growth_mb for t in results[way, transfer.GATEWAY] if t.rss_growth_mb is not None]
        rows.append(row(f"{number}. 1 GiB {way}, gateway RSS growth", growth, 1, " MB"))
        rows[-1].target, rows[-1].met = "<= 64 MB", met(max(growth) <= 64)  # the worst round
    return rows


def idle_figures(tmp: Path) -> list[Row]:
    """Figure 10: RSS per idle keep-alive client connection (gateway, bare aiohttp proxy) and per idle
    tunnel; a fresh proxy for every reading, nginx behind."""
    raise_nofile()
    sdk = f"   with an SDK-like request head (+8 fields, {len(SDK_FIELDS)} B)"
    readings: dict[str, list[IdleRound]] = {"gateway": [], sdk: [], BARE: []}
    peers = Peers(tmp)
    try:
        up = free_port()
        peers.nginx(up, free_port(), small_body(up))
        for r in range(ROUNDS):
            for name, rounds in readings.items():
                proxy = Peers(tmp)
                try:
                    port, target = free_port(), free_port()
                    if name == BARE:
                        rounds.append(idle_round(proxy.bare_proxy(port, up).pid, port))
                    elif name == sdk:
                        gateway = proxy.gateway(f"gw-sdk-{r}", idle_gateway_config(port, up, target))
                        rounds.append(idle_round(gateway.pid, port, fields=SDK_FIELDS))
                    else:
                        gateway = proxy.gateway(f"gw-idle-{r}", idle_gateway_config(port, up, target))
                        rounds.append(idle_round(gateway.pid, port, target))
                finally:
                    proxy.close()
    finally:
        peers.close()
    ours = readings["gateway"]
    per_client = [g.per_client_kb for g in ours]
    rows = [
        row("10. idle keep-alive client connection, RSS each", per_client, 1, " KB", clients=CLIENTS),
        row(sdk, [g.per_client_kb for g in readings[sdk]], 1, " KB", clients=CLIENTS, fields=SDK_FIELDS),
        row(f"   {BARE}", [b.per_client_kb for b in readings[BARE]], 1, " KB", clients=CLIENTS),
        row("10. idle tunnel, RSS each", [g.per_tunnel_kb or 0.0 for g in ours], 1, " KB", tunnels=TUNNELS),
    ]
    rows[0].data["rss_before_kb"] = [g.before_kb for g in ours]
    rows[0].measured += f" ({CLIENTS:,} held; max_client_connections {MAX_CLIENT_CONNECTIONS:,})"
    rows[0].target, rows[0].met = "<= 16 KB", met(Stat.of(per_client).median <= 16)
    rows[1].target, rows[1].met = "<= 16 KB", met(Stat.of(rows[1].data["samples"]).median <= 16)
    rows[3].measured += f" ({TUNNELS:,} held, on top of the clients)"
    return rows


SECTIONS: dict[str, Callable[[Path], list[Row]]] = {
    "proxy": proxy_figures,
    "stream": stream_figures,
    "limiter": limiter_figures,
    "instructions": instruction_figures,
    "transfer": transfer_figures,
    "idle": idle_figures,
}


def main() -> int:
    only = [
        name.strip() for name in os.environ.get("BENCH_ONLY", ",".join(SECTIONS)).split(",") if name.strip()
    ]
    unknown = [name for name in only if name not in SECTIONS]
    if unknown:
        print(
            f"bench: BENCH_ONLY names no section {unknown}; the sections: {', '.join(SECTIONS)}",
            file=sys.stderr,
        )
        return 1
    for tool in ("nginx", "wrk", "redis-server", "redis-cli", "curl", "valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 1
    started = datetime.now(UTC)
    tmp = Path(tempfile.mkdtemp(prefix="bt-bench-"))
    rows: list[Row] = []
    try:
        for part in only:
            (tmp / part).mkdir()
            print(f"... {part}", file=sys.stderr, flush=True)
            rows += SECTIONS[part](tmp / part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = (datetime.now(UTC) - started).total_seconds()

    print(
        f"bt-gateway bench {started:%Y-%m-%d %H:%M:%SZ}: {ROUNDS} rounds, wrk -t1 {DURATION} s per run, "
        f"{os.cpu_count()} CPUs, all on 127.0.0.1; median [min-max]; run took {elapsed:.0f} s"
    )
    width = max(len(r.figure) for r in rows)
    mwidth = max(len(r.measured) for r in rows)
    print(f"{'figure':<{width}}  {'measured':<{mwidth}}  {'target':<14} met")
    for r in rows:
        print(f"{r.figure:<{width}}  {r.measured:<{mwidth}}  {r.target:<14} {r.met}")

    results = HERE / "results"
    results.mkdir(exist_ok=True)
    out = results / f"{started:%Y%m%dT%H%M%SZ}.json"
    meta = {"started": started.isoformat(), "seconds": elapsed, "rounds": ROUNDS, "duration_s": DURATION}
    meta["cpus"] = os.cpu_count()
    meta["sections"] = only
    out.write_text(json.dumps({**meta, "figures": [asdict(r) for r in rows]}, indent=2) + "\n")
    print(f"written {out.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
