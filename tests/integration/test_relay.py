"""The signed-URL relay's promises, through the real gateway: links only where meant (https, the listed port,
one IDNA form), and nothing of the client's but the transfer reaches the object store.

The data plane is a scripted upstream whose `/logs3/overflow` answer carries the signed URL under test; the
object store is a TLS upstream that records what reaches it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import trustme

from tests.clients import Reply, assert_error, reply_of
from tests.conftest import (
    Canary,
    GatewayFactory,
    RawUpstream,
    RunningGateway,
    Upstream,
    json_reply,
    serve_named_tls,
)

SECRET = "relay-secret-for-tests-0123456789abcdef"
IDNA_NAME = "bücher.example"
IDNA_ASCII = "xn--bcher-kva.example"


def data_plane(raw: RawUpstream, **extra: Any) -> dict[str, Any]:
    """An advertised data route to `raw` (whose /logs3/overflow is a control document) and the relay."""
    return {
        "routes": [{"name": "data", "prefix": "/", "upstream": raw.url, "advertise": True}],
        **extra,
    }


async def slot(
    gw: RunningGateway,
    raw: RawUpstream,
    signed_url: str,
    key: str = "signedUrl",
    path: str = "/logs3/overflow",
) -> str:
    """The `key` URL the client receives when the data plane hands out `signed_url` under it."""
    raw.replies[path] = json_reply({key: signed_url})
    async with aiohttp.ClientSession() as client, client.get(gw.url + path) as resp:
        assert resp.status == 200
        url: str = (await resp.json())[key]
        return url


def forged_link(gw: RunningGateway, url: str, use: str = "up") -> str:
    """A link for `url` signed with the relay's own secret, as a gateway with another config would sign it."""
    fields = {"u": url, "e": round(time.time()) + 600, "m": use, "r": "data"}
    payload = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    mac = hmac.new(SECRET.encode(), payload.encode(), hashlib.sha256).digest()
    return f"{gw.url}/_relay/{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


async def put(url: str, body: bytes = b"{}") -> Reply:
    async with aiohttp.ClientSession() as client, client.put(url, data=body) as resp:
        return await reply_of(resp)


CLIENTS_OWN = {
    "Authorization": "Bearer sk-relay-test-key-0123456789",
    "Cookie": "session=s3cret",
    "Proxy-Authorization": "Basic Y29ycDpzM2NyZXQ=",
    "X-Forwarded-For": "10.9.8.7",
    "X-Forwarded-Host": "inside.corp",
    "X-Forwarded-Proto": "http",
    "Forwarded": "for=10.9.8.7;host=inside.corp",
    "X-Real-IP": "10.9.8.7",
}
TRANSFER = {"Content-Type": "application/json", "x-amz-meta-batch": "7", "Range": "bytes=0-1"}


async def test_nothing_of_the_clients_but_the_transfer_reaches_the_store(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, tls_upstream: Upstream, ca_file: Path
) -> None:
    store = f"localhost:{tls_upstream.port}"
    gw = await start_gateway(
        **data_plane(raw_upstream),
        allowlist=[raw_upstream.url.split("://")[1], store],
        relay={"allow_hosts": [store], "secret": SECRET},
        upstream={"ca_bundle": str(ca_file)},
    )
    up = await slot(gw, raw_upstream, f"https://{store}/up?X-Amz-Signature=1")
    down = await slot(gw, raw_upstream, f"https://{store}/down?X-Amz-Signature=2", "downloadUrl")
    async with aiohttp.ClientSession(headers={**CLIENTS_OWN, **TRANSFER}) as client:
        async with client.put(up, data=b'{"rows": []}') as resp:
            assert resp.status == 200
        async with client.get(down) as resp:
            assert resp.status == 200
    assert [(r.method, r.raw_path) for r in tls_upstream.recorder.requests] == [
        ("PUT", "/up?X-Amz-Signature=1"),
        ("GET", "/down?X-Amz-Signature=2"),
    ]
    for seen in tls_upstream.recorder.requests:
        names = {name.lower() for name, _ in seen.headers}
        assert names & {name.lower() for name in CLIENTS_OWN} == set(), seen.method
        assert {name.lower() for name in TRANSFER} <= names, seen.method


async def test_only_https_on_the_listed_port_becomes_a_relay_link(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, canary: Canary
) -> None:
    """An entry without a port is https on 443; one with a port, https on that port; never plain http."""
    listed = f"127.0.0.1:{canary.port}"
    gw = await start_gateway(
        **data_plane(raw_upstream),
        allowlist=[raw_upstream.url.split("://")[1], "store.test", listed],
        relay={"allow_hosts": ["store.test", listed], "secret": SECRET},
    )
    relayed = await slot(gw, raw_upstream, "https://store.test/k?X-Amz-Signature=1")
    assert relayed.startswith(gw.url + "/_relay/")
    for direct in (
        "http://store.test/k?X-Amz-Signature=2",  # plain http to a listed host
        "https://store.test:8443/k?X-Amz-Signature=3",  # a port the entry does not name
        f"http://{listed}/k?X-Amz-Signature=4",  # the listed port, but plain http
    ):
        assert await slot(gw, raw_upstream, direct) == direct
        assert_error(await put(forged_link(gw, direct)), 403, "relay_denied")
    assert canary.accepts == []  # no refused link made a connection


async def test_a_unicode_host_and_its_xn_form_are_one_host_at_both_steps(
    start_gateway: GatewayFactory,
    raw_upstream: RawUpstream,
    canary: Canary,
    test_ca: trustme.CA,
    ca_file: Path,
) -> None:
    """Listed as unicode, handed out in either form: judged and connected to as the one xn-- name."""
    async with serve_named_tls(test_ca, canary, IDNA_ASCII) as store:
        listed = f"{IDNA_NAME}:{store.port}"
        gw = await start_gateway(
            **data_plane(raw_upstream),
            allowlist=[raw_upstream.url.split("://")[1], listed],
            relay={"allow_hosts": [listed], "secret": SECRET},
            resolve={IDNA_ASCII: "127.0.0.1"},
            upstream={"ca_bundle": str(ca_file)},
        )
        for index, host in enumerate((IDNA_NAME, IDNA_ASCII, "BÜCHER.example")):
            link = await slot(gw, raw_upstream, f"https://{host}:{store.port}/k/{index}?X-Amz-Signature=s")
            assert link.startswith(gw.url + "/_relay/"), host
            reply = await put(link)
            assert reply.status == 200, reply
        seen = [(r.method, r.raw_path) for r in store.recorder.requests]
        host_headers = {dict(r.headers)["Host"] for r in store.recorder.requests}
    assert [method for method, _ in seen] == ["PUT"] * 3
    assert host_headers == {f"{IDNA_ASCII}:{store.port}"}
