"""The URL rewriter without sockets: boundaries, escaping, longest match, streaming equals one-shot."""

from __future__ import annotations

import gzip
import random
import zlib

import brotli
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import Code, GatewayFailure
from gateway.policy.urlrewrite import RewritePolicy, RuleSet, rewritable

APP = "https://www.braintrust.dev"
PUBLIC = "https://public.example.com"
RULES = RuleSet(
    [(APP, PUBLIC), (APP + "/app", PUBLIC + "/webapp"), ("https://api.braintrust.dev", "http://gw/dp")], 65536
)


@pytest.mark.parametrize(
    ("text", "out"),
    [
        (APP, PUBLIC),
        (APP + "/", PUBLIC + "/"),
        (APP + "/x?y#z", PUBLIC + "/x?y#z"),
        (f'"{APP}"', f'"{PUBLIC}"'),
        (APP + "?q", PUBLIC + "?q"),
        (APP + "#f", PUBLIC + "#f"),
        (APP + " and", PUBLIC + " and"),
        (APP + ".evil.com", APP + ".evil.com"),
        (APP + "x", APP + "x"),
        (APP + ":8443/x", APP + ":8443/x"),
        ("x" + APP, "x" + APP),
        (APP + "/app/p", PUBLIC + "/webapp/p"),  # longest from wins
        (APP + "/apps", PUBLIC + "/apps"),  # ...but only on a segment boundary
        (APP.replace("/", "\\/") + "\\/x", PUBLIC.replace("/", "\\/") + "\\/x"),
    ],
)
def test_boundaries(text: str, out: str) -> None:
    assert RULES.rewrite_all(text.encode()) == out.encode()


def test_headers_only_url_ones() -> None:
    assert RULES.rewrite_header("location", APP + "/a") == PUBLIC + "/a"
    assert RULES.rewrite_header("Refresh", f"0; url={APP}/a") == f"0; url={PUBLIC}/a"
    assert RULES.rewrite_header("X-Other", APP) == APP


def test_noop_rules_and_long_rules() -> None:
    assert RuleSet([(APP, APP)], 100).empty
    with pytest.raises(ValueError, match="over max_buffer_kb"):
        RuleSet([(APP + "/" + "x" * 200, PUBLIC)], 100)


@pytest.mark.parametrize(
    ("content_type", "yes"),
    [
        ("application/json", True),
        ("text/html; charset=utf-8", True),
        ("application/vnd.x+json", True),
        ("text/event-stream", True),
        ("application/javascript", True),
        ("image/png", False),
        (None, False),
        ("application/octet-stream", False),
    ],
)
def test_rewritable_types(content_type: str | None, yes: bool) -> None:
    assert rewritable(content_type) is yes


PIECES = [
    APP.encode(),
    b"https://api.braintrust.dev",
    APP.replace("/", "\\/").encode(),
    b"/app",
    b"/",
    b"x",
    b".",
    b":",
    b" ",
    b"\n\n",
    b"https://www.brai",
    b'"',
    b"\\/",
    b"-",
]


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for point in points:
        out.append(data[last:point])
        last = point
    out.append(data[last:])
    return out


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.sampled_from(PIECES), max_size=50), cuts=st.lists(st.integers(0, 10_000), max_size=20)
)
def test_streaming_equals_one_shot(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    stream = RULES.stream()
    out = b"".join(stream.feed(chunk) for chunk in chunked(data, cuts)) + stream.finish()
    assert out == RULES.rewrite_all(data)


ENCODERS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
}
DECODERS = {
    "gzip": gzip.decompress,
    "deflate": zlib.decompress,
    "br": brotli.decompress,
    "zstd": lambda d: zstandard.ZstdDecompressor().decompressobj().decompress(d),
}


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(st.sampled_from(PIECES), max_size=50),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    coding=st.sampled_from(sorted(ENCODERS)),
)
def test_compressed_streaming_equals_one_shot(parts: list[bytes], cuts: list[int], coding: str) -> None:
    data = b"".join(parts)
    body = RewritePolicy.body(RULES, "application/json", coding)
    assert body is not None
    encoded = ENCODERS[coding](data)
    out = b"".join(body.feed(chunk) for chunk in chunked(encoded, cuts)) + body.finish()
    assert DECODERS[coding](out) == RULES.rewrite_all(data)


def test_carry_over_is_bounded_by_the_longest_rule() -> None:
    rng = random.Random(7)
    stream = RULES.stream()
    longest = max(
        len(p) for p in (APP + "/app", APP.replace("/", "\\/") + "\\/app", "https://api.braintrust.dev")
    )
    fed = 0
    while fed < 10_000_000:
        chunk = b"".join(rng.choice(PIECES) for _ in range(rng.randint(1, 4000)))[: rng.randint(1, 65536)]
        stream.feed(chunk)
        fed += len(chunk)
        assert stream.buffered <= longest + 2


def test_event_stream_events_are_not_held_back() -> None:
    stream = RULES.stream()
    assert stream.feed(f"data: {APP}/x\n\n".encode()) == f"data: {PUBLIC}/x\n\n".encode()
    assert stream.feed(b"data: ends with https://www.brai") == b"data: ends with "
    assert stream.feed(b"ntrust.dev\n\n") == "https://www.braintrust.dev\n\n".replace(APP, PUBLIC).encode()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_malformed_and_truncated_bodies_raise(coding: str) -> None:
    body = RewritePolicy.body(RULES, "application/json", coding)
    assert body is not None
    with pytest.raises(GatewayFailure) as info:
        body.feed(b"\x00\xff garbage that is not " + coding.encode() + b"\xff" * 32)
        body.finish()
    assert info.value.error.code is Code.UPSTREAM_BAD_ENCODING
    truncated = RewritePolicy.body(RULES, "application/json", coding)
    assert truncated is not None
    whole = ENCODERS[coding](APP.encode() * 1000)
    truncated.feed(whole[: len(whole) // 2])
    with pytest.raises(GatewayFailure):
        truncated.finish()


def test_untouched_when_type_or_coding_unknown() -> None:
    assert RewritePolicy.body(RULES, "image/png", None) is None
    assert RewritePolicy.body(RULES, "application/json", "gzip, br") is None
    assert RewritePolicy.body(RULES, "application/json", "compress") is None


def test_policy_caches_rule_sets_per_external_url() -> None:
    policy = RewritePolicy(((APP, PUBLIC),), (("https://api.braintrust.dev", "/data-plane"),), 65536)
    first = policy.rules_for("http://gw:8080")
    assert policy.rules_for("http://gw:8080") is first
    assert first.rewrite_all(b"https://api.braintrust.dev/v1") == b"http://gw:8080/data-plane/v1"
    assert (
        policy.rules_for(None).rewrite_all(b"https://api.braintrust.dev/v1")
        == b"https://api.braintrust.dev/v1"
    )
