"""Pure pieces of the request path: routes, header policy, error table, credentials, log scrubbing."""

from __future__ import annotations

import hashlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

import gateway
from gateway.errors import STATUS, Code
from gateway.exchange import request_id
from gateway.headers import downstream_response_headers, upstream_request_headers
from gateway.logs import loggable_target, loggable_text, redact_secrets, scrub
from gateway.policy.credentials import bearer_token, fingerprint
from gateway.policy.routes import RouteTable, RouteTarget


def test_every_code_has_a_status() -> None:
    assert set(STATUS) == set(Code)
    assert all(400 <= status < 600 for status in STATUS.values())


def table() -> RouteTable:
    return RouteTable(
        (
            RouteTarget.from_url("app", "/", "https://www.braintrust.dev"),
            RouteTarget.from_url("data", "/data-plane", "https://api.braintrust.dev/base"),
        )
    )


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/data-plane", "data"),
        ("/data-plane/v1", "data"),
        ("/data-planex", "app"),
        ("/", "app"),
        ("//x", "app"),
    ],
)
def test_longest_prefix_on_segment_boundary(path: str, route: str) -> None:
    found = table().match(path)
    assert found is not None and found.name == route


def test_upstream_url_keeps_double_slash_as_path() -> None:
    app = table().match("/")
    assert app is not None
    url = app.url_for("//evil.com/x", "a=%41")
    assert url.host == "www.braintrust.dev"
    assert url.raw_path_qs == "//evil.com/x?a=%41"
    data = table().match("/data-plane/v1/x")
    assert data is not None
    assert str(data.url_for("/data-plane/v1/x", "")) == "https://api.braintrust.dev/base/v1/x"
    assert data.host_header == "api.braintrust.dev"


def test_request_headers_policy() -> None:
    incoming = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Host", "gw"),
                ("Connection", "close, X-A"),
                ("X-A", "1"),
                ("X-Forwarded-For", "1.1.1.1"),
                ("X-Request-Id", "client"),
                ("Expect", "100-continue"),
                ("Accept", "x"),
            ]
        )
    )
    out = upstream_request_headers(
        incoming,
        host_header="up:8443",
        client_ip="2.2.2.2",
        client_host="gw",
        scheme="http",
        request_id="rid",
    )
    assert out == [
        ("Accept", "x"),
        ("Host", "up:8443"),
        ("X-Forwarded-For", "1.1.1.1, 2.2.2.2"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "gw"),
        ("Via", "1.1 bt-gateway"),
        ("X-Request-Id", "rid"),
    ]


def test_fields_named_in_connection_are_not_carried_into_the_ones_we_append() -> None:
    """`Connection: X-Forwarded-For` makes the client's value hop-by-hop: only ours goes on."""
    named = "X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, Via"
    incoming = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Connection", named),
                ("X-Forwarded-For", "1.2.3.4"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "spoofed"),
                ("Via", "1.1 spoof"),
            ]
        )
    )
    sent = {"host_header": "up", "client_ip": "9.9.9.9", "scheme": "http", "request_id": "rid"}
    out = CIMultiDict(upstream_request_headers(incoming, client_host=None, **sent))
    assert out.getall("X-Forwarded-For") == ["9.9.9.9"]
    assert out.getall("X-Forwarded-Proto") == ["http"]
    assert "X-Forwarded-Host" not in out
    assert out.getall("Via") == ["1.1 bt-gateway"]
    upstream = CIMultiDictProxy(CIMultiDict([("Connection", "Via"), ("Via", "1.1 upstream-internal")]))
    assert CIMultiDict(downstream_response_headers(upstream, "rid")).getall("Via") == ["1.1 bt-gateway"]


def test_response_headers_policy() -> None:
    incoming = CIMultiDictProxy(
        CIMultiDict([("Transfer-Encoding", "chunked"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
    )
    out = CIMultiDict(downstream_response_headers(incoming, "rid"))
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert "Transfer-Encoding" not in out
    assert out["X-Request-Id"] == "rid"


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc ", "abc"),
        ("abc", "abc"),
        ("Basic Zm9v", None),
        ("", None),
        (None, None),
        ("Bearer ", None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_fingerprint_is_12_hex_of_sha256() -> None:
    assert fingerprint("abc") == hashlib.sha256(b"abc").hexdigest()[:12]
    assert fingerprint(None) is None


def test_request_id() -> None:
    assert request_id("abc-1") == "abc-1"
    assert len(request_id("has space")) == 32
    assert len(request_id("x" * 200)) == 32
    assert request_id(None) != request_id(None)


def test_scrub_removes_credentials() -> None:
    text = "auth Bearer abc.def-123 and sk-0123456789abcdef and http://user:pw@host/ ok"
    assert scrub(text) == "auth [redacted] and [redacted] and http://[redacted]host/ ok"
    event = redact_secrets(None, "info", {"Authorization": "Bearer x", "msg": "Bearer yyy", "n": 1})
    assert event == {"Authorization": "[redacted]", "msg": "[redacted]", "n": 1}


def test_policy_and_config_never_import_aiohttp() -> None:
    """Layering: policies and config are pure, testable without sockets or an event loop."""
    names = [m.name for m in pkgutil.walk_packages(gateway.__path__, "gateway.")]
    pure = [n for n in names if n.startswith(("gateway.policy", "gateway.config"))]
    assert "gateway.policy.allowlist" in pure and "gateway.config.model" in pure
    code = (
        f"import sys; [__import__(n) for n in {pure!r}]; "
        "print(sorted(m for m in sys.modules if 'aiohttp' in m))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_every_error_code_has_a_status_and_a_readme_row() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for code in Code:
        row = f"| `{code.value}` | {STATUS[code]} |"
        assert row in readme, row


def test_every_test_security_md_names_exists() -> None:
    """SECURITY.md backs each claim with a test by name: a renamed or deleted test must not leave the
    claim pointing at nothing."""
    tests = Path(__file__).resolve().parents[1]
    named = set(re.findall(r"\btest_\w+", (tests.parent / "SECURITY.md").read_text()))
    files = {path.stem for path in tests.rglob("test_*.py")}
    defined = {
        name for path in tests.rglob("test_*.py") for name in re.findall(r"def (test_\w+)", path.read_text())
    }
    assert len(named) > 40
    assert sorted(named - files - defined) == []


TOKEN = "eyJ1Ijoi.c2ln"
TOKEN_FP = hashlib.sha256(TOKEN.encode()).hexdigest()[:12]


@pytest.mark.parametrize(
    ("target", "logged"),
    [
        ("/v1/project?api_key=x", "/v1/project"),
        (f"/_relay/{TOKEN}?x=1", f"/_relay/{TOKEN_FP}"),
        (f"//_relay/{TOKEN}", f"//_relay/{TOKEN_FP}"),
        (f"/data-plane/_relay/{TOKEN}", f"/data-plane/_relay/{TOKEN_FP}"),
        (f"/data-plane/%5Frelay%2F{TOKEN}", f"/data-plane/%5Frelay%2F{TOKEN_FP}"),
        (f"http://gw:8080/_RELAY/{TOKEN}", f"http://gw:8080/_RELAY/{TOKEN_FP}"),
        ("https://b.s3.amazonaws.com/k?X-Amz-Signature=abc#f", "https://b.s3.amazonaws.com/k"),
    ],
)
def test_a_logged_target_has_no_query_and_no_relay_token(target: str, logged: str) -> None:
    assert loggable_target(target) == logged


def test_urls_quoted_in_free_text_lose_their_query() -> None:
    text = "400, message='Bad', url='https://b.s3.amazonaws.com/k?X-Amz-Signature=abc' via /_relay/" + TOKEN
    assert (
        loggable_text(text)
        == f"400, message='Bad', url='https://b.s3.amazonaws.com/k' via /_relay/{TOKEN_FP}"
    )
