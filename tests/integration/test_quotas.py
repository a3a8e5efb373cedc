"""A token's quota cannot be dodged: not by switching to forward-proxy mode, not by tunnelling, not by
spelling the header differently or sending two."""

from __future__ import annotations

from gateway.policy.proxyauth import hash_password
from tests.clients import assert_error, basic, get, raw_connect, send_raw
from tests.conftest import NAME, Canary, GatewayFactory, Logs, NamedUpstream, Upstream, route_to
from tests.integration.test_forward_proxy import proxy_config


async def test_absolute_form_to_a_routes_upstream_shares_its_bucket(
    start_gateway: GatewayFactory, upstream: Upstream, logs: Logs
) -> None:
    gw = await start_gateway(
        **route_to(upstream, rate_limit={"max_requests": 2}, forward_proxy={"http_ports": [upstream.port]})
    )
    port, auth = gw.gateway.ports["listen"], "Authorization: Bearer tok-1\r\n"
    absolute = f"http://127.0.0.1:{upstream.port}/via-proxy"
    assert (await get(port, "/via-reverse", "Host: gw\r\n" + auth)).status == 200
    assert (await get(port, absolute, f"Host: 127.0.0.1:{upstream.port}\r\n" + auth)).status == 200
    assert_error(await get(port, "/again", "Host: gw\r\n" + auth), 429, "rate_limited")
    assert_error(await get(port, absolute + "-again", "Host: gw\r\n" + auth), 429, "rate_limited")
    assert (await logs.access(absolute))["route"] == "app"  # not a bucket of its own


async def test_absolute_form_only_to_http_ports(
    start_gateway: GatewayFactory, upstream: Upstream, canary: Canary, logs: Logs
) -> None:
    gw = await start_gateway(
        allowlist=["127.0.0.1"],  # any port of this host: only http_ports keeps the proxy from scanning
        routes=[{"name": "app", "prefix": "/", "upstream": upstream.url}],
    )
    target = f"http://127.0.0.1:{canary.port}/probe"
    assert_error(await get(gw.gateway.ports["listen"], target), 403, "egress_denied")
    assert (await logs.access(target))["reason"] == "port_not_allowed"
    assert canary.accepts == []


def limited_tls_config(tls: NamedUpstream, **forward_proxy: object) -> dict[str, object]:
    config = proxy_config(tls, **forward_proxy)
    config["rate_limit"] = {"max_requests": 5}
    config["advertise_url"] = "http://gw.corp.example:8080"
    return config


async def test_tunnels_to_a_limited_host_can_be_refused_with_the_way_in(
    start_gateway: GatewayFactory, named_tls: NamedUpstream
) -> None:
    gw = await start_gateway(**limited_tls_config(named_tls, tunnel_to_limited_hosts="deny"))
    async with raw_connect(gw.gateway.ports["listen"], f"{NAME}:{named_tls.port}") as (answer, _, _):
        assert_error(answer, 403, "use_reverse_mode")
        assert "BRAINTRUST_APP_URL=http://gw.corp.example:8080" in answer.json()["error"]["message"]
    assert named_tls.recorder.started == []
    assert gw.gateway.tunnels.opened == 0


async def test_a_host_whose_route_has_no_limit_can_still_be_tunnelled_to(
    start_gateway: GatewayFactory, named_tls: NamedUpstream
) -> None:
    config = limited_tls_config(named_tls, tunnel_to_limited_hosts="deny")
    config["rate_limit"] = "off"
    gw = await start_gateway(**config)
    async with raw_connect(gw.gateway.ports["listen"], f"{NAME}:{named_tls.port}") as (answer, _, _):
        assert answer.status == 200


async def test_allowing_such_tunnels_is_said_once_at_start(
    start_gateway: GatewayFactory, named_tls: NamedUpstream, logs: Logs
) -> None:
    await start_gateway(**limited_tls_config(named_tls))
    [warning] = logs.named("tunnels_bypass_rate_limit")
    assert warning["hosts"] == [NAME]


async def test_with_proxy_auth_new_tunnels_count_per_user(
    start_gateway: GatewayFactory, named_tls: NamedUpstream
) -> None:
    users = {"alice": hash_password("a-pw", log2_n=10), "bob": hash_password("b-pw", log2_n=10)}
    config = proxy_config(named_tls, auth={"users": users}, rate_limit={"max_tunnels": 1})
    gw = await start_gateway(**config)
    port, target = gw.gateway.ports["listen"], f"{NAME}:{named_tls.port}"
    statuses = []
    for user, password in (("alice", "a-pw"), ("alice", "a-pw"), ("bob", "b-pw")):  # one address, two users
        async with raw_connect(port, target, f"Proxy-Authorization: {basic(user, password)}\r\n") as (
            a,
            _,
            _,
        ):
            statuses.append(a.status)
    assert statuses == [200, 429, 200]


async def test_two_authorization_headers_are_refused(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**route_to(upstream))
    reply = await send_raw(
        gw.gateway.ports["listen"],
        b"GET /x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n",
    )
    assert_error(reply, 400, "ambiguous_credentials")
    assert upstream.recorder.started == []


async def test_spellings_of_one_token_share_one_bucket(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await start_gateway(**route_to(upstream, rate_limit={"max_requests": 2}))
    port = gw.gateway.ports["listen"]
    statuses = [
        (await get(port, "/x", f"Host: gw\r\nAuthorization: {spelling}\r\n")).status
        for spelling in ("Bearer  tok-9", "bearer tok-9", "Bearer\ttok-9")
    ]
    assert statuses == [200, 200, 429]
