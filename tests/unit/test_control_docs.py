"""Control documents without sockets: relay links where allowed, every way around the gateway named."""

from __future__ import annotations

from typing import Any

from gateway.bypass import DATA_PLANE_NOT_ROUTED, RELAY_HOST_NOT_ALLOWED, Bypass
from gateway.control_docs import RELAY_HINT, inspect
from gateway.relay import RelayGrant
from tests.unit.test_relay import GATEWAY, S3, relay, token_of

ELSEWHERE = "https://other-bucket.example.com/k?sig=1"


def upload_slots() -> dict[str, Any]:
    return {
        "method": "PUT",
        "signedUrl": S3,
        "nested": [{"downloadUrl": S3}, {"signedUrl": ELSEWHERE}],
        "key": "k1",
        "url": S3,  # not a key the SDKs read signed URLs from: left alone
    }


def test_signed_urls_become_links_only_for_allowed_hosts_and_the_rest_are_named() -> None:
    doc = upload_slots()
    changed, found = inspect(doc, GATEWAY, relay(), "data", token_digest=None)
    assert changed
    assert doc["signedUrl"].startswith(GATEWAY + "/_relay/")
    assert isinstance(relay().open(token_of(doc["nested"][0]["downloadUrl"]), "GET"), RelayGrant)
    assert doc["nested"][1]["signedUrl"] == ELSEWHERE
    assert doc["url"] == S3 and doc["key"] == "k1"
    assert found == [Bypass(RELAY_HOST_NOT_ALLOWED, "other-bucket.example.com", RELAY_HINT)]


def test_without_a_relay_every_signed_url_is_named_and_none_changes() -> None:
    doc = upload_slots()
    changed, found = inspect(doc, GATEWAY, None, "data", token_digest=None)
    assert not changed and doc == upload_slots()
    assert sorted(b.host for b in found) == ["bucket.s3.us-east-1.amazonaws.com", "other-bucket.example.com"]
    assert {b.event for b in found} == {RELAY_HOST_NOT_ALLOWED}


def login(*urls: str | None) -> dict[str, Any]:
    return {"org_info": [{"id": "o", "name": "acme", "api_url": url, "proxy_url": url} for url in urls]}


def test_a_login_that_sends_the_sdk_to_an_unrouted_data_plane_is_named_with_the_config_to_add() -> None:
    doc = login(f"{GATEWAY}/data-plane", "https://bt-api.corp.example:8443", None)
    changed, found = inspect(doc, GATEWAY, None, "app", token_digest=None)
    assert not changed
    [bypass] = found  # api_url and proxy_url name the same host: said once
    assert (bypass.event, bypass.host) == (DATA_PLANE_NOT_ROUTED, "bt-api.corp.example")
    assert bypass.detail == (
        "route it through the gateway: BT_GATEWAY_DATA_PLANE_URL=https://bt-api.corp.example:8443, "
        "or in routes: {name: data, prefix: /data-plane, upstream: https://bt-api.corp.example:8443, "
        "advertise: true} (and bt-api.corp.example in the allowlist)"
    )


def test_a_routed_login_and_other_documents_name_nothing() -> None:
    assert inspect(login(f"{GATEWAY}/data-plane", GATEWAY), GATEWAY, None, "app", token_digest=None) == (
        False,
        [],
    )
    base = GATEWAY + "/gw"  # a gateway behind a path: a longer path is not under it
    found = inspect(
        login(base + "ment/data-plane", base + "/data-plane"), base, None, "app", token_digest=None
    )[1]
    assert [b.host for b in found] == ["gw.corp.example"]
    for doc in ([1, "x"], {"org_info": "x"}, {"org_info": [None, {"api_url": 3}]}, "text", None):
        assert inspect(doc, GATEWAY, None, "app", token_digest=None) == (False, [])
