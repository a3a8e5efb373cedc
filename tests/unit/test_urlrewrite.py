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
from gateway.policy.urlrewrite import (
    BodyRewriter,
    RewriteAbandoned,
    RewriteLimits,
    RewritePolicy,
    RuleSet,
    rewritable,
)

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


POLICY = RewritePolicy((), (), 65536)


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(st.sampled_from(PIECES), max_size=50),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    coding=st.sampled_from(sorted(ENCODERS)),
)
def test_compressed_streaming_equals_one_shot(parts: list[bytes], cuts: list[int], coding: str) -> None:
    data = b"".join(parts)
    body = POLICY.body(RULES, "application/json", coding)
    assert body is not None
    encoded = ENCODERS[coding](data)
    out = b"".join(b"".join(body.feed(chunk)) for chunk in chunked(encoded, cuts)) + body.finish()
    assert DECODERS[coding](out) == RULES.rewrite_all(data)


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.sampled_from(PIECES), max_size=50), coding=st.sampled_from(sorted(ENCODERS)))
def test_a_whole_body_is_rewritten_as_the_stream_would_be(parts: list[bytes], coding: str) -> None:
    data = b"".join(parts)
    body = POLICY.body(RULES, "application/json", coding)
    assert body is not None
    assert DECODERS[coding](body.whole(ENCODERS[coding](data))) == RULES.rewrite_all(data)
    assert body.skipped is None


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
    body = POLICY.body(RULES, "application/json", coding)
    assert body is not None
    with pytest.raises(GatewayFailure) as info:
        list(body.feed(b"\x00\xff garbage that is not " + coding.encode() + b"\xff" * 32))
        body.finish()
    assert info.value.error.code is Code.UPSTREAM_BAD_ENCODING
    truncated = POLICY.body(RULES, "application/json", coding)
    assert truncated is not None
    whole = ENCODERS[coding](APP.encode() * 1000)
    list(truncated.feed(whole[: len(whole) // 2]))
    with pytest.raises(GatewayFailure):
        truncated.finish()


def test_untouched_when_type_or_coding_unknown() -> None:
    assert POLICY.body(RULES, "image/png", None) is None
    assert POLICY.body(RULES, "application/json", "gzip, br") is None
    assert POLICY.body(RULES, "application/json", "compress") is None


def test_policy_caches_rule_sets_per_external_url() -> None:
    policy = RewritePolicy(((APP, PUBLIC),), (("https://api.braintrust.dev", "/data-plane"),), 65536)
    first = policy.rules_for("http://gw:8080")
    assert policy.rules_for("http://gw:8080") is first
    assert first.rewrite_all(b"https://api.braintrust.dev/v1") == b"http://gw:8080/data-plane/v1"
    assert (
        policy.rules_for(None).rewrite_all(b"https://api.braintrust.dev/v1")
        == b"https://api.braintrust.dev/v1"
    )


# --- limits: growth, decoded size, inflate ratio -----------------------------------------------------


GROW = RuleSet(((APP, "https://" + "g" * 100 + ".example"),), 65536)  # each URL grows 4.5 times


def limited(coding: str, rules: RuleSet = RULES, **limits: float) -> BodyRewriter:
    policy = RewritePolicy((), (), 65536, RewriteLimits(**limits))  # type: ignore[arg-type]
    body = policy.body(rules, "application/json", coding)
    assert body is not None
    return body


def test_growth_past_the_ratio_sends_the_rest_unrewritten() -> None:
    body = limited("identity", GROW, max_growth_ratio=2)
    text = (APP + " ").encode() * 20_000
    out = b"".join(b"".join(body.feed(part)) for part in chunked(text, list(range(0, len(text), 4096))))
    out += body.finish()
    assert body.skipped == "growth"
    assert len(out) <= 2 * len(text) + 4096 * 5  # the bound, overshot by one rewritten chunk at most
    assert out.endswith(text[-4096:])  # the rest passed as it came
    assert GROW.rewrite_all(text).startswith(out[:4096])  # the start was rewritten


def test_a_whole_body_past_the_growth_ratio_passes_unrewritten() -> None:
    body = limited("identity", GROW, max_growth_ratio=2)
    text = (APP + " ").encode() * 20_000
    assert body.whole(text) == text
    assert body.skipped == "growth"


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_a_whole_bomb_is_abandoned(coding: str) -> None:
    with pytest.raises(RewriteAbandoned) as info:
        limited(coding).whole(ENCODERS[coding](b"0" * 32 * 2**20))
    assert info.value.reason == "inflate_ratio"


def test_small_bodies_may_grow_within_the_slack() -> None:
    body = limited("identity", GROW, max_growth_ratio=1.0)
    text = (APP + " ").encode() * 100  # 2.8 KiB growing to 12 KiB: under the 16 KiB slack
    assert b"".join(body.feed(text)) + body.finish() == GROW.rewrite_all(text)
    assert body.skipped is None


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_a_bomb_is_abandoned_before_it_inflates(coding: str) -> None:
    """32 MiB of zeros compress to a few KiB: past 100:1 (after the first MiB) decoding stops."""
    bomb = ENCODERS[coding](b"0" * 32 * 2**20)
    body = limited(coding)
    decoded = 0
    with pytest.raises(RewriteAbandoned) as info:
        for piece in body.feed(bomb):
            decoded += len(piece)
    assert info.value.reason == "inflate_ratio"
    assert decoded < 20 * 2**20  # bounded pieces: nowhere near the whole bomb was held


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_the_decoded_ceiling_holds_for_honest_ratios(coding: str) -> None:
    data = random.Random(3).randbytes(3 * 2**20)  # incompressible: ratio about 1
    body = limited(coding, max_decoded=2**20)
    with pytest.raises(RewriteAbandoned) as info:
        for part in chunked(ENCODERS[coding](data), list(range(0, 4 * 2**20, 65536))):
            list(body.feed(part))
    assert info.value.reason == "decoded_too_large"


def test_realtime_websocket_urls_are_advertised_too() -> None:
    """The login's realtime_url is the data plane's wss:// address: it must not leak the direct host."""
    policy = RewritePolicy((), (("https://api.braintrust.dev", "/data-plane"),), 65536)
    body = b'{"api_url": "https://api.braintrust.dev", "realtime_url": "wss://api.braintrust.dev/rt"}'
    assert policy.rules_for("http://gw:8080").rewrite_all(body) == (
        b'{"api_url": "http://gw:8080/data-plane", "realtime_url": "ws://gw:8080/data-plane/rt"}'
    )
    assert b"wss://gw.example/data-plane/rt" in policy.rules_for("https://gw.example").rewrite_all(body)
