"""The shared limit on Redis as production runs it: Sentinel through a failover, Cluster, TLS with a password
from a Secret, Redis's clock, a store that cannot serve refused at start, and bounded, expiring keys."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from structlog.testing import capture_logs

from gateway.policy.ratelimit import LimitSpec, RateLimiter, RateLimitSettings
from tests.clients import free_port, run_cli
from tests.conftest import Upstream
from tests.gateway_process import GatewayProcess
from tests.integration.test_ratelimit import _spread, _two_gateways, hit
from tests.redis_server import RedisCluster, RedisSentinel, RedisServer
from tests.unit.test_ratelimit import Clock

pytestmark = pytest.mark.redis
FAILOVER_DEADLINE_S = 30


def _no_traceback(gateways: list[GatewayProcess]) -> None:
    for g in gateways:
        assert not [line for line in g.raw_lines if "Traceback" in line or "TypeError" in line]


async def test_sentinel_shares_the_limit_through_a_failover(tmp_path: Path, upstream: Upstream) -> None:
    """Counts made before the master dies were replicated, so the promoted replica keeps them; while no
    master answers, requests fail closed as configured, and the gateways find the new master by themselves."""
    redis = RedisSentinel(tmp_path)
    rate_limit = {"max_requests": 5, "storage": redis.url, "on_storage_error": "deny"}
    rate_limit["storage_timeout_ms"] = 300
    gateways = _two_gateways(tmp_path, upstream, rate_limit)
    urls = [g.url for g in gateways]
    try:
        assert await _spread(urls, 3) == [200] * 3  # tok-a: 3 of 5, across both gateways
        assert redis.master.cli("WAIT", "1", "5000") == "1"  # replicated to the one replica
        assert len(redis.replica.cli("KEYS", "btgw:mw:*").split()) == 1
        redis.master.stop()
        killed = time.monotonic()
        during = await _until_failed_over(redis, urls)
        switch_s = time.monotonic() - killed
        after = await _spread(urls, 3)  # tok-a again, on the new master: 2 left of 5
    finally:
        for g in gateways:
            g.stop()
        redis.stop()
    assert after == [200, 200, 429]
    assert set(during) <= {200, 503}  # fail closed (503 rate_limit_unavailable) or decided: nothing else
    print(f"failover: {during.count(503)} x 503, then {during.count(200)} x 200, in {switch_s:.1f} s")
    for g in gateways:
        assert g.events("rate_limit_storage_unavailable") and g.events("rate_limit_storage_recovered")
        codes = {a["error_code"] for a in g.events("access") if a["status"] == 503}
        assert codes <= {"rate_limit_unavailable"}
    _no_traceback(gateways)


async def _until_failed_over(redis: RedisSentinel, urls: list[str]) -> list[int]:
    """Fresh tokens through both gateways until the sentinel names the replica and both decide on it."""
    statuses: list[int] = []
    deadline = time.monotonic() + FAILOVER_DEADLINE_S
    while time.monotonic() < deadline:
        promoted = redis.master_port() == redis.replica.port
        tries = await _spread(urls, 2, token=f"probe-{len(statuses)}")
        statuses += tries
        if promoted and tries == [200, 200]:
            return statuses
        await asyncio.sleep(0.05)
    raise AssertionError(f"no failover within {FAILOVER_DEADLINE_S} s: {statuses[-10:]}")


async def test_cluster_gives_every_token_exactly_its_limit(tmp_path: Path, upstream: Upstream) -> None:
    cluster = RedisCluster(tmp_path)
    gateways = _two_gateways(tmp_path, upstream, {"max_requests": 3, "storage": cluster.url})
    tokens = [f"tok-{n}" for n in range(24)]
    try:
        async with aiohttp.ClientSession() as client:
            statuses = {
                token: [(await hit(client, gateways[i % 2].url + "/v1/x", token)).status for i in range(4)]
                for token in tokens
            }
        keys = [node.cli("KEYS", "btgw:mw:*").split() for node in cluster.nodes]
        slots = {cluster.nodes[0].cli("CLUSTER", "KEYSLOT", key) for node_keys in keys for key in node_keys}
    finally:
        for g in gateways:
            g.stop()
        cluster.stop()
    assert statuses == {token: [200, 200, 200, 429] for token in tokens}
    assert sum(len(node_keys) for node_keys in keys) == len(tokens)  # one key per token, on its own node
    assert sum(1 for node_keys in keys if node_keys) >= 2
    assert len(slots) == len(tokens)
    _no_traceback(gateways)


def _tls_files(tmp_path: Path, ca: trustme.CA) -> tuple[Path, Path, Path]:
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp_path / "redis.crt", tmp_path / "redis.key", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert, key, ca_file


PASSWORD = "s3cret-redis-pass-7f1c"


@pytest.mark.parametrize("source", ["file", "env"])
async def test_tls_and_a_password_from_a_secret(
    tmp_path: Path, upstream: Upstream, test_ca: trustme.CA, source: str
) -> None:
    """rediss:// verified against the CA bundle; the password comes from a mounted Secret or the
    environment, never the YAML, and is never logged or printed."""
    tls = _tls_files(tmp_path, test_ca)
    redis = RedisServer(tmp_path, tls=tls, password=PASSWORD)
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    rate_limit: dict[str, Any] = {"max_requests": 3, "storage": redis.url, "storage_ca_bundle": str(tls[2])}
    env = {}
    if source == "file":
        rate_limit["storage_password_file"] = str(secret)
    else:
        env["BT_GATEWAY_RATE_LIMIT_STORAGE_PASSWORD"] = PASSWORD
    host = upstream.url.split("://")[1]
    config = {"allowlist": [host], "routes": [{"name": "app", "prefix": "/", "upstream": upstream.url}]}
    gateway = GatewayProcess({**config, "rate_limit": rate_limit}, tmp_path, env=env)
    try:
        statuses = await _spread([gateway.url], 4)
        checked = run_cli("check-config", "-c", str(gateway.config_path), env={**os.environ, **env})
    finally:
        gateway.stop()
        redis.stop()
    assert statuses == [200, 200, 200, 429]
    assert checked.returncode == 0, checked.stderr
    assert PASSWORD not in checked.stdout + checked.stderr
    assert PASSWORD not in "".join(gateway.raw_lines)
    assert PASSWORD not in gateway.config_path.read_text()


def _limiter(redis: RedisServer, clock: Callable[[], float], **settings: Any) -> RateLimiter:
    spec = LimitSpec(settings.pop("max_requests", 3), settings.pop("window_s", 60))
    settings.setdefault("storage_timeout_ms", 2000)
    return RateLimiter(RateLimitSettings(default=spec, storage=redis.url, **settings), clock=clock)


async def test_replicas_with_clocks_apart_share_one_exact_window(tmp_path: Path) -> None:
    """One replica's clock runs 90 s ahead (more than the 60 s window): the window is still Redis's."""
    redis = RedisServer(tmp_path)
    on_time = _limiter(redis, time.time)
    ahead = _limiter(redis, lambda: time.time() + 90)
    try:
        first = [await on_time.check("app", "tok:x") for _ in range(2)] + [await ahead.check("app", "tok:x")]
        refused = [await ahead.check("app", "tok:x"), await on_time.check("app", "tok:x")]
    finally:
        await on_time.close()
        await ahead.close()
        redis.stop()
    assert [d.outcome for d in first] == ["allow"] * 3
    assert [d.outcome for d in refused] == ["deny", "deny"]
    for decision in refused:  # Retry-After from Redis's window, in each replica's own clock
        assert decision.error is not None
        assert 55 <= int(dict(decision.error.headers)["Retry-After"]) <= 60


async def test_an_outage_is_warned_again_while_it_lasts(tmp_path: Path) -> None:
    """Every `WARN_EVERY_S` of the limiter's clock, one more line with the decisions made meanwhile."""
    redis = RedisServer(tmp_path)
    clock = Clock()
    limiter = _limiter(redis, clock.time, storage_timeout_ms=500)
    try:
        assert (await limiter.check("app", "tok:x")).outcome == "allow"
        redis.stop()
        with capture_logs() as logs:
            for step in (0, 30, 29, 2, 1, 60):  # seconds between decisions
                clock.now += step
                assert (await limiter.check("app", "tok:x")).outcome == "storage_error_allow"
        redis.start()
        with capture_logs() as recovered:
            await _until_allowed(limiter)
    finally:
        await limiter.close()
        redis.stop()
    warnings = [e for e in logs if e["event"] == "rate_limit_storage_unavailable"]
    assert [(w["down_s"], w["decisions_without_storage"]) for w in warnings] == [(0, 1), (61, 4), (122, 6)]
    assert [(e["event"], e["down_s"]) for e in recovered][-1] == ("rate_limit_storage_recovered", 122)


async def _until_allowed(limiter: RateLimiter) -> None:
    """The client reconnects by itself once Redis listens again; a fresh key each try."""
    deadline = time.monotonic() + 10
    while (await limiter.check("app", f"tok:{time.monotonic()}")).outcome != "allow":
        assert time.monotonic() < deadline, "the limiter did not reconnect"
        await asyncio.sleep(0.05)


async def test_idle_keys_expire_and_what_a_token_costs(tmp_path: Path) -> None:
    """Each key lives one second past its window (read with PTTL, not waited for); a token's memory at
    the default limit (100/min) and at 10,000/min is what the README quotes."""
    redis = RedisServer(tmp_path)
    small = _limiter(redis, time.time, max_requests=100)
    large = _limiter(redis, time.time, max_requests=10_000)
    try:
        ttls = []
        for limiter, count in ((small, 100), (large, 10_000)):
            for _ in range(count):
                await limiter.check("app", f"tok:{count:0>64}")  # as long as a sha256 in hex
            ttls.append(int(redis.cli("PTTL", f"btgw:mw:app/{count}/60/tok:{count:0>64}")))
        keys = redis.cli("KEYS", "btgw:mw:*").split()
        encodings = [redis.cli("OBJECT", "ENCODING", key) for key in keys]
        sizes = [int(redis.cli("MEMORY", "USAGE", key, "SAMPLES", "0")) for key in keys]
    finally:
        await small.close()
        await large.close()
        redis.stop()
    assert len(keys) == 2
    assert [55_000 < ttl <= 61_000 for ttl in ttls] == [True, True]  # 1 s after its last request's window
    print(dict(zip(keys, zip(encodings, sizes, strict=True), strict=True)))
    by_limit = {("100/" in key): size for key, size in zip(keys, sizes, strict=True)}
    assert by_limit[True] <= 8 * 1024 and by_limit[False] <= 1.5 * 2**20  # 4.1 KiB and 1.23 MiB measured


def _storage_config(tmp_path: Path, rate_limit: dict[str, Any]) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"rate_limit": rate_limit}))
    return path


@pytest.mark.parametrize(
    "case", ["wrong_password", "no_password", "not_a_cluster", "a_cluster_node", "untrusted_tls"]
)
def test_a_store_that_cannot_serve_is_refused_at_start(
    tmp_path: Path, test_ca: trustme.CA, case: str
) -> None:
    """Not an outage but a config error: check-config and serve both exit 2 with the same one line."""
    redis, rate_limit, expected = _unusable_store(tmp_path, test_ca, case)
    path = _storage_config(tmp_path, rate_limit)
    try:
        checked = run_cli("check-config", "-c", str(path))
        served = run_cli("serve", "-c", str(path))
    finally:
        redis.stop()
    for result in (checked, served):
        assert result.returncode == 2
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{path}:2: rate_limit.storage: the store answered")
        assert expected in lines[0]
        assert PASSWORD not in result.stdout + result.stderr
    assert checked.stderr == served.stderr


def _unusable_store(
    tmp_path: Path, ca: trustme.CA, case: str
) -> tuple[RedisServer | RedisCluster, dict[str, Any], str]:
    """(the servers, `rate_limit`, what the refusal must say) for one way a store cannot serve."""
    if case == "a_cluster_node":  # a single-server URI for one node of a cluster: MOVED for most keys
        cluster = RedisCluster(tmp_path)
        storage = f"redis://127.0.0.1:{cluster.nodes[1].port}/0"
        return cluster, {"storage": storage}, "(a Redis Cluster node: name the nodes in redis+cluster://)"
    if case == "not_a_cluster":
        redis = RedisServer(tmp_path)
        storage = f"redis+cluster://127.0.0.1:{redis.port}"
        return redis, {"storage": storage}, "This instance has cluster support disabled"
    if case == "untrusted_tls":
        redis = RedisServer(tmp_path, tls=_tls_files(tmp_path, ca), password=PASSWORD)
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        rate_limit = {"storage": redis.url, "storage_password": PASSWORD, "storage_ca_bundle": str(other)}
        return redis, rate_limit, "certificate verify failed"
    redis = RedisServer(tmp_path, password=PASSWORD)
    if case == "no_password":
        return redis, {"storage": redis.url}, "AuthenticationRequiredError: Authentication required."
    expected = "AuthenticationFailureError: invalid username-password pair or user is disabled."
    return redis, {"storage": redis.url, "storage_password": "not-it"}, expected


def test_an_unreachable_store_only_warns_at_start(tmp_path: Path) -> None:
    """Nothing listens: an outage, not a config error; requests are decided by on_storage_error."""
    path = _storage_config(tmp_path, {"storage": f"redis://127.0.0.1:{free_port()}/0"})
    checked = run_cli("check-config", "-c", str(path))
    assert checked.returncode == 0
    warning = (
        f"warning: {path}:2: rate_limit.storage: unreachable now (ConnectionError): requests are decided by "
        "on_storage_error: allow until it answers"
    )
    assert warning in checked.stderr.splitlines()
