"""The admin listener's access rules without sockets: Host (DNS rebinding), cross-site, token."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from gateway.errors import Code
from gateway.policy.admin_access import (
    OPEN,
    AdminAccess,
    bearer_matches,
    cross_site_reason,
    host_allowed,
    host_name,
    state_changes_open,
)

TOKEN = "t" * 32
OWN = frozenset({"localhost", "gw-pod-7", "bt-gateway-admin.egress.svc"})


def headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict({name.replace("_", "-"): value for name, value in values.items()})


@pytest.mark.parametrize(
    ("authority", "name"),
    [
        ("10.1.2.3:9901", "10.1.2.3"),
        ("[fd00::7]:9901", "fd00::7"),
        ("[::1]", "::1"),
        ("LocalHost:9901", "localhost"),
        ("gw-pod-7.", "gw-pod-7"),
        ("fd00::7", "fd00::7"),
    ],
)
def test_host_name_takes_the_name_out_of_a_host_header(authority: str, name: str) -> None:
    assert host_name(authority) == name


@pytest.mark.parametrize(
    "host",
    [
        "10.244.1.17:9901",  # the kubelet's probe: Host is the pod IP
        "127.0.0.1:9901",
        "[::1]:9901",
        "[fd00::17]:9901",
        "localhost:9901",  # curl localhost:9901
        "gw-pod-7:9901",  # this host's own name
        "BT-GATEWAY-ADMIN.egress.svc:9901",  # admin.allowed_hosts
        None,  # HTTP/1.0: no Host; a browser always sends one
    ],
)
def test_ip_literals_localhost_and_own_names_are_this_listener(host: str | None) -> None:
    assert host_allowed(host, OWN)


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:9901", "127.0.0.1.nip.io:9901", "localhost.evil.example", ""]
)
def test_any_other_name_is_a_rebinding_page(host: str) -> None:
    assert not host_allowed(host, OWN)


HOST = "127.0.0.1:9901"
FORM = "is what a cross-site form sends"
NOT_US = "is not this listener"
URLENCODED = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"Sec-Fetch-Site": "cross-site"}, "Sec-Fetch-Site is 'cross-site'"),
        ({"Sec-Fetch-Site": "same-site"}, "Sec-Fetch-Site is 'same-site'"),
        ({"Origin": "https://evil.example", "Host": HOST}, f"Origin 'https://evil.example' {NOT_US}"),
        ({"Origin": "null", "Host": HOST}, f"Origin 'null' {NOT_US}"),
        ({"Origin": "http://127.0.0.1:9902", "Host": HOST}, f"Origin 'http://127.0.0.1:9902' {NOT_US}"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, f"Content-Type {URLENCODED} {FORM}"),
        ({"Content-Type": "Multipart/Form-Data; boundary=x"}, f"Content-Type multipart/form-data {FORM}"),
        ({"Content-Type": "text/plain;charset=UTF-8"}, f"Content-Type text/plain {FORM}"),
    ],
)  # fmt: skip
def test_a_browsers_cross_site_request_is_named(values: dict[str, str], reason: str) -> None:
    assert cross_site_reason(CIMultiDict(values)) == reason


@pytest.mark.parametrize(
    "values",
    [
        {},  # curl -X POST, kubectl exec ... curl
        {"Content-Type": "application/json"},
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:9901", "Host": "127.0.0.1:9901"},
        {"Sec-Fetch-Site": "none"},
    ],
)
def test_tools_and_same_origin_requests_are_not_cross_site(values: dict[str, str]) -> None:
    assert cross_site_reason(CIMultiDict(values)) is None


@pytest.mark.parametrize(
    ("authorization", "ok"),
    [
        (f"Bearer {TOKEN}", True),
        (f"bearer {TOKEN}", True),
        (f"Bearer {TOKEN}x", False),
        (f"Bearer {TOKEN[:-1]}", False),
        (f"Basic {TOKEN}", False),
        ("Bearer ", False),
        (None, False),
    ],
)
def test_the_bearer_token_must_match_exactly(authorization: str | None, ok: bool) -> None:
    assert bearer_matches(authorization, TOKEN) is ok


def access(host: str, token: str | None = None, allowed: tuple[str, ...] = ()) -> AdminAccess:
    return AdminAccess.build(host, token, allowed, ("gw-pod-7",))


def test_own_names_are_localhost_this_host_a_named_bind_and_the_allowed_list() -> None:
    assert access("0.0.0.0", allowed=("Admin.Example.",)).own_names == {
        "localhost",
        "gw-pod-7",
        "admin.example",
    }
    assert access("gw.internal").own_names == {"localhost", "gw-pod-7", "gw.internal"}


def test_probes_the_scrape_and_the_status_page_need_no_token_but_a_right_host() -> None:
    guarded = access("0.0.0.0", TOKEN)
    assert {path for _, path in OPEN} == {"/healthz", "/readyz", "/metrics", "/status", "/status.json"}
    for method, path in sorted(OPEN):
        assert guarded.check(method, path, headers(Host="10.0.0.5:9901")) is None
        refusal = guarded.check(method, path, headers(Host="evil.example:9901"))
        assert refusal is not None and refusal.code is Code.ADMIN_HOST_DENIED


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/reload"), ("POST", "/anything-new"), ("GET", "/reload")]
)
def test_everything_not_open_needs_the_token(method: str, path: str) -> None:
    guarded = access("0.0.0.0", TOKEN)
    missing = guarded.check(method, path, headers(Host="10.0.0.5"))
    assert missing is not None and missing.code is Code.ADMIN_TOKEN_INVALID and missing.status == 401
    assert dict(missing.headers) == {"WWW-Authenticate": 'Bearer realm="bt-gateway admin"'}
    wrong = guarded.check(method, path, headers(Host="10.0.0.5", Authorization="Bearer " + "x" * 32))
    assert wrong is not None and wrong.code is Code.ADMIN_TOKEN_INVALID
    assert guarded.check(method, path, headers(Host="10.0.0.5", Authorization=f"Bearer {TOKEN}")) is None


def test_without_a_token_reload_is_open_on_loopback_only() -> None:
    assert access("127.0.0.1").check("POST", "/reload", headers(Host="127.0.0.1:9901")) is None
    assert state_changes_open(None, "localhost")
    for host in ("0.0.0.0", "::", "10.0.0.5", "gw.internal"):
        shut = access(host)
        assert not state_changes_open(None, host)
        refusal = shut.check("POST", "/reload", headers(Host="127.0.0.1:9901"))
        assert refusal is not None and refusal.code is Code.ADMIN_TOKEN_NOT_SET and refusal.status == 403


def test_a_token_is_required_on_loopback_too_once_set() -> None:
    refusal = access("127.0.0.1", TOKEN).check("POST", "/reload", headers(Host="127.0.0.1"))
    assert refusal is not None and refusal.code is Code.ADMIN_TOKEN_INVALID


def test_cross_site_is_refused_before_the_token_is_even_looked_at() -> None:
    auth = {"Authorization": f"Bearer {TOKEN}", "Host": "127.0.0.1"}
    for extra in ({"Origin": "https://evil.example"}, {"Content-Type": "text/plain"}):
        for rules in (access("127.0.0.1"), access("0.0.0.0", TOKEN)):
            refusal = rules.check("POST", "/reload", CIMultiDict({**auth, **extra}))
            assert refusal is not None and refusal.code is Code.CROSS_SITE_DENIED and refusal.status == 403
