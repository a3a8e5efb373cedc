"""Relay links without sockets: what is signed, what is refused, how long a link lives."""

from __future__ import annotations

import pytest
from yarl import URL

from gateway.policy.allowlist import Allowlist
from gateway.relay import DENIED, Relay, RelayGrant, signed_url_expiry

GATEWAY = "http://gw.corp.example:8080"
S3 = (
    "https://bucket.s3.us-east-1.amazonaws.com/logs/k1?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Date=20261204T120000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=abc%2Fdef"
)
NOW = 1796385600.0  # 2026-12-04T12:00:00Z


def relay(now: float = NOW, secret: bytes = b"k" * 32) -> Relay:
    return Relay(Allowlist.parse(["*.s3.us-east-1.amazonaws.com"]), secret, 3600, clock=lambda: now)


def token_of(link: str) -> str:
    assert link.startswith(GATEWAY + "/_relay/")
    return link.removeprefix(GATEWAY + "/_relay/")


def test_a_link_opens_to_the_exact_signed_url() -> None:
    link = relay().link(S3, "up", "data", GATEWAY, None)
    assert link is not None
    grant = relay().open(token_of(link), "PUT")
    assert grant == RelayGrant(url=URL(S3, encoded=True), route="data")
    assert isinstance(grant, RelayGrant) and str(grant.url) == S3  # the signature's bytes untouched


@pytest.mark.parametrize("method", ["GET", "DELETE", "PATCH"])
def test_an_upload_link_opens_for_put_and_post_only(method: str) -> None:
    link = relay().link(S3, "up", "data", GATEWAY, None)
    assert link is not None
    assert relay().open(token_of(link), "POST") != DENIED
    assert relay().open(token_of(link), method) is DENIED


def test_forged_altered_and_foreign_tokens_are_denied() -> None:
    link = relay().link(S3, "up", "data", GATEWAY, None)
    assert link is not None
    token = token_of(link)
    payload, _, mac = token.partition(".")
    other = relay(secret=b"x" * 32).link(S3.replace("k1", "k2"), "up", "data", GATEWAY, None)
    assert other is not None
    for bad in (
        payload + "." + mac[:-2] + "AA",  # altered signature
        payload[:-4] + "AAAA." + mac,  # altered payload
        token_of(other),  # signed with another secret
        "not-a-token",
        "",
        payload + ".",
    ):
        assert relay().open(bad, "PUT") is DENIED, bad


def test_a_link_expires_with_its_signed_url() -> None:
    assert signed_url_expiry(URL(S3)) == NOW + 900
    link = relay().link(S3, "up", "data", GATEWAY, None)
    assert link is not None
    assert relay(now=NOW + 899).open(token_of(link), "PUT") != DENIED
    assert relay(now=NOW + 901).open(token_of(link), "PUT") is DENIED


@pytest.mark.parametrize(
    ("url", "expiry"),
    [
        ("https://s.example/k?X-Goog-Date=20261204T120000Z&X-Goog-Expires=60", NOW + 60),
        ("https://a.blob.core.windows.net/c/k?sv=2022&se=2026-12-04T12%3A10%3A00Z&sig=x", NOW + 600),
        (f"https://b.s3.amazonaws.com/k?Expires={int(NOW) + 30}&Signature=x", NOW + 30),
        ("https://b.example/k?X-Amz-Date=garbage&X-Amz-Expires=1", None),
        ("https://b.example/k", None),
        ("https://b.example/k?Expires=nan&Signature=x", None),  # odd values are no expiry at all
        ("https://b.example/k?Expires=inf&Signature=x", None),
        ("https://b.example/k?Expires=-1e999&Signature=x", None),
        ("https://b.example/k?X-Amz-Date=20261204T120000Z&X-Amz-Expires=" + "9" * 400, None),
    ],
)
def test_expiry_from_each_store(url: str, expiry: float | None) -> None:
    assert signed_url_expiry(URL(url)) == expiry


def test_a_link_never_outlives_max_ttl() -> None:
    forever = "https://bucket.s3.us-east-1.amazonaws.com/k?X-Amz-Date=20261204T120000Z&X-Amz-Expires=604800"
    link = relay().link(forever, "up", "data", GATEWAY, None)
    assert link is not None
    assert relay(now=NOW + 3599).open(token_of(link), "PUT") != DENIED
    assert relay(now=NOW + 3601).open(token_of(link), "PUT") is DENIED


@pytest.mark.parametrize(
    ("url", "relayed"),
    [
        ("https://b.s3.us-east-1.amazonaws.com/k?sig=1", "https://b.s3.us-east-1.amazonaws.com/k?sig=1"),
        ("https://B.S3.us-east-1.amazonaws.com:443/k?sig=1", "https://b.s3.us-east-1.amazonaws.com/k?sig=1"),
        ("http://b.s3.us-east-1.amazonaws.com/k?sig=1", None),  # plain http: never
        ("https://b.s3.us-east-1.amazonaws.com:8443/k?sig=1", None),  # no port listed: 443 only
        ("https://u:p@b.s3.us-east-1.amazonaws.com/k", None),
        ("https://store.example:9000/k?a=%2F", "https://store.example:9000/k?a=%2F"),  # the listed port
        ("https://store.example/k", None),
        ("https://bücher.example/k?a=%2f", "https://xn--bcher-kva.example/k?a=%2f"),  # one IDNA form
        ("https://xn--bcher-kva.example/k", "https://xn--bcher-kva.example/k"),
    ],
)
def test_what_is_relayed_and_the_form_it_is_connected_to(url: str, relayed: str | None) -> None:
    hosts = Allowlist.parse(["*.s3.us-east-1.amazonaws.com", "store.example:9000", "bücher.example"])
    target = Relay(hosts, b"k" * 32, 3600, clock=lambda: NOW).target(url)
    assert (str(target) if target is not None else None) == relayed


def test_a_link_carries_the_bucket_of_the_token_it_was_handed_to() -> None:
    digest = "ab" * 32
    for given in (digest, None):  # a link handed to an anonymous request stays anonymous
        link = relay().link(S3, "up", "data", GATEWAY, given)
        assert link is not None
        grant = relay().open(token_of(link), "PUT")
        assert isinstance(grant, RelayGrant) and grant.token_digest == given
