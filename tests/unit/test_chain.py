"""The step chains without sockets: a generation is built from config and run on hand-made Exchanges."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
from multidict import CIMultiDict

from gateway.config.model import GatewayConfig
from gateway.exchange import Exchange
from gateway.explain import explain, explain_request
from gateway.generation import Generation
from gateway.policy.credentials import digest_of
from gateway.policy.proxyauth import ScryptHash, hash_password
from gateway.policy.routes import RouteTable, RouteTarget
from gateway.steps import SEEN_TARGET_CHARS, SEEN_TARGETS, Router

PASSWORD = "correct horse"


def exchange(target: str, method: str = "GET", **headers: str) -> Exchange:
    return Exchange(
        request_id="r",
        method=method,
        raw_target=target,
        client_ip="10.0.0.1",
        headers=CIMultiDict({"Authorization": "Bearer t", **headers}),
        token_digest="d" * 64,
    )


@pytest.fixture
async def build() -> AsyncIterator[Any]:
    built: list[Generation] = []

    async def make(**config: Any) -> Generation:
        data = {
            "allowlist": ["api.example.com", "www.braintrust.dev"],
            "routes": [
                {"name": "app", "prefix": "/", "upstream": "https://www.braintrust.dev"},
                {"name": "data", "prefix": "/data-plane", "upstream": "https://api.example.com/base"},
            ],
            **config,
        }
        generation = await Generation.build(GatewayConfig.model_validate(data))
        built.append(generation)
        return generation

    yield make
    for generation in built:
        await generation.close()


async def test_the_declared_order(build: Any) -> None:
    auth = {"users": {"alice": hash_password(PASSWORD, log2_n=10)}}
    generation = await build(forward_proxy={"auth": auth})
    assert generation.http.names == (
        "limits",
        "method",
        "host",
        "credentials",
        "redirect",
        "route",
        "allowlist",
        "forward_proxy",
        "proxy_auth",
        "deny_paths",
        "ratelimit",
    )
    assert generation.connect.names == (
        "limits",
        "credentials",
        "connect",
        "forward_proxy",
        "proxy_auth",
        "tunnel_limit",
    )
    assert (await build()).http.names == tuple(n for n in generation.http.names if n != "proxy_auth")


async def test_only_policy_refusals_are_relaxable(build: Any) -> None:
    """What report mode may let go, step by step: size bounds, malformed requests, proxy auth, relay links
    and switched-off modes never; a change to this list is a change to the README's promise."""
    auth = {"users": {"alice": hash_password(PASSWORD, log2_n=10)}}
    generation = await build(forward_proxy={"auth": auth})
    relaxable = {
        step.name: sorted(getattr(step, "relaxable", ()))
        for step in (*generation.http.steps, *generation.connect.steps)
    }
    assert relaxable == {
        "limits": [],
        "method": ["trace"],
        "host": [],
        "credentials": [],
        "redirect": [],
        "route": [],
        "allowlist": ["deny"],
        "forward_proxy": ["deny"],
        "proxy_auth": [],
        "deny_paths": ["deny"],
        "ratelimit": ["anonymous_denied", "delay_too_long", "deny", "queue_full"],
        "connect": [],
        "tunnel_limit": ["deny"],
    }


async def test_an_admitted_request_records_each_decision(build: Any) -> None:
    generation = await build()
    ex = exchange("/data-plane/logs3?x=1")
    assert await generation.http.run(ex) is None
    assert ex.decisions == ["route:data", "allowlist:allow", "ratelimit:allow"]
    assert ex.target is not None and str(ex.target.url) == "https://api.example.com/base/logs3?x=1"
    assert dict(ex.response_headers)["RateLimit-Policy"] == '"default";q=100;w=60'


@pytest.mark.parametrize(
    ("target", "method", "decisions", "code"),
    [
        ("http://evil.example/x", "GET", ["route:forward_proxy", "allowlist:deny"], "egress_denied"),
        (
            "http://api.example.com/x",
            "GET",
            ["route:forward_proxy", "allowlist:allow", "forward_proxy:allow"],
            None,
        ),
        (
            "http://api.example.com:8/x",  # no port scanning: absolute-form only to http_ports
            "GET",
            ["route:forward_proxy", "allowlist:allow", "forward_proxy:deny"],
            "egress_denied",
        ),
        ("/x", "TRACE", ["method:trace"], "method_not_allowed"),
        ("*", "OPTIONS", ["route:bad_target"], "bad_request"),
        ("evil.example:443", "CONNECT", ["connect:target", "forward_proxy:deny"], "egress_denied"),
        ("api.example.com:22", "CONNECT", ["connect:target", "forward_proxy:deny"], "egress_denied"),
        ("api.example.com", "CONNECT", ["connect:bad_target"], "bad_connect_target"),
    ],
)
async def test_refusals_stop_the_chain_where_they_happen(
    build: Any, target: str, method: str, decisions: list[str], code: str | None
) -> None:
    generation = await build()
    chain = generation.connect if method == "CONNECT" else generation.http
    ex = exchange(target, method)
    decision = await chain.run(ex)
    if code is None:
        assert decision is None
        assert ex.decisions == [*decisions, "ratelimit:allow"]
    else:
        assert decision is not None and decision.error is not None
        assert str(decision.error.code) == code
        assert ex.decisions == decisions


async def test_a_denied_destination_costs_no_password_check(
    build: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[str] = []
    monkeypatch.setattr(ScryptHash, "verify", lambda stored, password: checks.append(password) or False)
    generation = await build(forward_proxy={"auth": {"users": {"alice": hash_password(PASSWORD, log2_n=10)}}})
    header = "Basic " + base64.b64encode(b"alice:guess").decode()
    ex = exchange("evil.example:443", "CONNECT", **{"Proxy-Authorization": header})
    decision = await generation.connect.run(ex)
    assert decision is not None and decision.error is not None and str(decision.error.code) == "egress_denied"
    assert checks == []
    ex = exchange("api.example.com:443", "CONNECT", **{"Proxy-Authorization": header})
    decision = await generation.connect.run(ex)
    assert decision is not None and decision.error is not None and decision.error.status == 407
    assert checks == ["guess"]
    assert ex.decisions == ["connect:target", "forward_proxy:allow", "proxy_auth:deny"]


async def test_reverse_mode_needs_no_proxy_auth(build: Any) -> None:
    generation = await build(forward_proxy={"auth": {"users": {"alice": hash_password(PASSWORD, log2_n=10)}}})
    ex = exchange("/v1/project")
    assert await generation.http.run(ex) is None
    assert "proxy_auth" not in "".join(ex.decisions)


async def test_browser_links_redirect_before_routing(build: Any) -> None:
    generation = await build()
    ex = exchange("/app/org/p/experiments/e", Accept="text/html,application/xhtml+xml")
    decision = await generation.http.run(ex)
    assert decision is not None and decision.location == "https://www.braintrust.dev/app/org/p/experiments/e"
    assert ex.decisions == ["redirect:public_url"]


async def test_oversized_declared_body_is_refused_first(build: Any) -> None:
    generation = await build(limits={"max_body_mb": 1})
    ex = exchange("/x", "POST", **{"Content-Length": str(2 * 2**20)})
    decision = await generation.http.run(ex)
    assert (
        decision is not None and decision.error is not None and str(decision.error.code) == "body_too_large"
    )
    assert ex.decisions == ["limits:body"]


@pytest.mark.parametrize(
    "target",
    [
        "/data-plane/brainstore/backfill",
        "/data-plane/brainstore",
        "/data-plane/%62rainstore/x",
        "/data-plane/brainstore%2Fx",
        "/data-plane//brainstore/x",
        "/data-plane/a/../brainstore/x",
        "/data-plane/./brainstore/x",
        "/data-plane/x/..%2Fbrainstore",
    ],
)
async def test_deny_paths_match_every_spelling_of_a_path(build: Any, target: str) -> None:
    generation = await build(deny_paths=["/brainstore/**"])
    ex = exchange(target)
    decision = await generation.http.run(ex)
    assert decision is not None and decision.error is not None
    assert (decision.error.code, decision.error.status) == ("path_denied", 403)
    assert ex.decisions[-1] == "deny_paths:deny"


async def test_deny_paths_per_route_and_paths_above_the_root(build: Any) -> None:
    routes = [
        {"name": "app", "prefix": "/", "upstream": "https://www.braintrust.dev"},
        {
            "name": "data",
            "prefix": "/data-plane",
            "upstream": "https://api.example.com",
            "deny_paths": ["/v1/*/delete"],
        },
    ]
    generation = await build(routes=routes)
    for target, code in (
        ("/data-plane/v1/abc/delete", "path_denied"),
        ("/data-plane/v1/abc/keep", None),
        ("/v1/abc/delete", None),  # another route, another list
        ("/data-plane/../../etc", "bad_path"),
    ):
        decision = await generation.http.run(exchange(target))
        assert (str(decision.error.code) if decision and decision.error else None) == code, target


async def test_a_repeated_target_routes_the_same_and_the_memory_of_targets_is_bounded() -> None:
    routes = RouteTable(
        (
            RouteTarget.from_url("app", "/", "https://www.braintrust.dev"),
            RouteTarget.from_url("data", "/data-plane", "https://api.example.com/base"),
        )
    )
    router = Router(routes)
    for _ in range(2):  # the second time from the routed-target table
        for target, url in (
            ("/data-plane/logs3?x=1", "https://api.example.com/base/logs3?x=1"),
            ("/data-planex", "https://www.braintrust.dev/data-planex"),
            ("/v1/project", "https://www.braintrust.dev/v1/project"),
        ):
            ex = exchange(target)
            router.decide(ex)
            assert ex.target is not None and str(ex.target.url) == url
            assert ex.upstream_host == ex.target.route.host
    for n in range(SEEN_TARGETS + 10):
        router.decide(exchange(f"/v1/object/{n}"))
    router.decide(exchange("/v1/" + "x" * SEEN_TARGET_CHARS))  # too long to remember
    assert 0 < len(router._seen) <= SEEN_TARGETS
    assert all(len(target) <= SEEN_TARGET_CHARS for target in router._seen)


async def test_tracing_counts_nothing_that_running_counts(build: Any) -> None:
    """`Chain.trace` (explain) asks the counting steps through `peek`: a limit of 2 traced any number of
    times is still whole, and failed passwords traced past the lock-out limit lock nobody out."""
    auth = {"users": {"alice": hash_password(PASSWORD, log2_n=10)}, "max_failures_per_minute": 2}
    generation = await build(
        rate_limit={"max_requests": 2}, forward_proxy={"auth": auth, "http_ports": [443]}
    )
    for _ in range(3):
        ex = exchange("/x")
        assert [name for name, _ in await generation.http.trace(ex)][-1] == "ratelimit"
        assert ex.decisions == ["route:app", "allowlist:allow", "ratelimit:allow"]
    assert await generation.http.run(exchange("/x")) is None
    traced = await generation.http.trace(exchange("/x"))
    assert traced[-1][1] is not None and dict(traced[-1][1].facts)["count"] == 1
    assert await generation.http.run(exchange("/x")) is None  # the second of two: no slot was taken
    decision = (await generation.http.trace(exchange("/x")))[-1][1]
    assert decision is not None and decision.error is not None and str(decision.error.code) == "rate_limited"
    wrong = {"Proxy-Authorization": "Basic " + base64.b64encode(b"alice:guess").decode()}
    for _ in range(3):
        decision = (await generation.connect.trace(exchange("api.example.com:443", "CONNECT", **wrong)))[-1][
            1
        ]
        assert decision is not None and decision.error is not None
        assert str(decision.error.code) == "proxy_auth_required"
    for code in ("proxy_auth_required", "proxy_auth_required", "too_many_auth_failures"):
        decision = await generation.connect.run(exchange("api.example.com:443", "CONNECT", **wrong))
        assert decision is not None and decision.error is not None and str(decision.error.code) == code
    decision = (await generation.connect.trace(exchange("api.example.com:443", "CONNECT", **wrong)))[-1][1]
    assert decision is not None and decision.error is not None
    assert str(decision.error.code) == "too_many_auth_failures"  # a lock-out in force shows


async def test_a_serving_process_shows_its_own_in_memory_count_and_a_delay(build: Any) -> None:
    """POST /explain runs in the serving process: its in-memory count is real there. Over a limit with
    `on_limit: delay`, the request would wait for a slot, then go on."""
    generation = await build(rate_limit={"max_requests": 1, "on_limit": "delay", "max_delay_s": 120})
    served = exchange("/x")
    served.token_digest = digest_of("Bearer t")
    assert await generation.http.run(served) is None
    report = await explain(generation, explain_request(["/x"], token="t", resolve=False), live=True)
    limit = report["rate_limit"]
    assert (report["outcome"], limit["verdict"], limit["count"]) == ("forward", "delayed", 1)
    assert limit["note"] == "this process's own count (in-memory storage: each process counts apart)"
    assert 0 < limit["wait_s"] <= 60
    report = await explain(generation, explain_request(["/x"], token="t", resolve=False))
    assert report["rate_limit"]["count"] is None  # the CLI's fresh process would always read 0
