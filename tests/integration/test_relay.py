"""The signed-URL relay's promises, through the real gateway: links only where meant (https, the listed port,
one IDNA form), nothing of the client's but the transfer reaches the object store, and a transfer counts
in the bucket of the token its link was handed to, no log line holds a link or a signed URL, and a hostile
control document passes as it came.

The data plane is a scripted upstream whose `/logs3/overflow` answer carries the signed URL under test; the
object store is a TLS upstream that records what reaches it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import trustme

from tests.clients import Reply, assert_error, get, reply_of
from tests.conftest import (
    STORE,
    Canary,
    GatewayFactory,
    RawUpstream,
    RunningGateway,
    Upstream,
    json_reply,
    serve_named_tls,
)
from tests.fake_braintrust import FakeBraintrust
from tests.gateway_process import GatewayProcess

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


def forged_link(gateway_url: str, url: str, use: str = "up") -> str:
    """A link for `url` signed with the relay's own secret, as a gateway with another config would sign it."""
    fields = {"u": url, "e": round(time.time()) + 600, "m": use, "r": "data"}
    payload = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    mac = hmac.new(SECRET.encode(), payload.encode(), hashlib.sha256).digest()
    return f"{gateway_url}/_relay/{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


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
TRANSFER = {  # what describes the transfer, a resumable upload's part included (GCS, Azure)
    "Content-Type": "application/json",
    "x-amz-meta-batch": "7",
    "Range": "bytes=0-1",
    "Content-Range": "bytes 0-11/12",
    "X-Upload-Content-Type": "application/json",
}


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
        assert_error(await put(forged_link(gw.url, direct)), 403, "relay_denied")
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


KEY_A = "sk-relay-key-a-0123456789abcdef"
KEY_B = "sk-relay-key-b-0123456789abcdef"


async def overflow_link(url: str, key: str | None) -> str:
    """An upload slot asked for as the SDK asks, with `key` (or none): its signedUrl is a relay link."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession(headers=headers) as client:
        async with client.post(url + "/data-plane/logs3/overflow", json={"size_bytes": 1}) as resp:
            assert resp.status == 200, await resp.text()
            link: str = (await resp.json())["signedUrl"]
    assert link.startswith(url + "/_relay/")
    return link


async def test_a_transfer_counts_in_the_bucket_of_the_token_its_link_was_handed_to(
    tmp_path: Path, store_tls: ssl.SSLContext, ca_file: Path
) -> None:
    """With `anonymous: deny`, the SDK's tokenless upload is A's: A's limit reached by its transfers is 429
    for A's link and A's own calls, not for B's."""
    async with FakeBraintrust(store_host=STORE, store_tls=store_tls) as fake:
        store = f"{STORE}:{fake.store_port}"
        config = {
            **fake.gateway_config(store),
            "rate_limit": {"max_requests": 3, "window_minutes": 1, "anonymous": "deny"},
            "relay": {"allow_hosts": [store], "secret": SECRET},
            "upstream": {"ca_bundle": str(ca_file)},
        }
        gw = GatewayProcess(config, tmp_path)
        try:
            link_a = await overflow_link(gw.url, KEY_A)  # A: 1 of 3
            link_b = await overflow_link(gw.url, KEY_B)  # B: 1 of 3
            statuses_a = [(await put(link_a)).status for _ in range(3)]  # A: 2, 3, then over
            status_b = (await put(link_b)).status  # B: 2 of 3
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY_B}"}) as client:
                async with client.put(link_a, data=b"{}") as resp:  # B's credential on A's link: A's bucket
                    status_a_by_b = resp.status
        finally:
            gw.stop()
    assert (statuses_a, status_b, status_a_by_b) == ([200, 200, 429], 200, 429)
    relayed = [e for e in gw.events("access") if e["path"].startswith("/_relay/")]
    fingerprints = {hashlib.sha256(k.encode()).hexdigest()[:12]: k for k in (KEY_A, KEY_B)}
    assert [(fingerprints[e["token_fp"]], e["status"]) for e in relayed] == [
        (KEY_A, 200),
        (KEY_A, 200),
        (KEY_A, 429),
        (KEY_B, 200),
        (KEY_A, 429),
    ]
    assert [r.status for r in fake.objects.requests] == [200] * 3


async def test_a_link_handed_to_an_anonymous_request_stays_anonymous(
    start_gateway: GatewayFactory, store_tls: ssl.SSLContext, ca_file: Path
) -> None:
    """Per client address, as the request that received it was: a token sent with the transfer changes
    nothing."""
    async with FakeBraintrust(store_host=STORE, store_tls=store_tls) as fake:
        store = f"{STORE}:{fake.store_port}"
        gw = await start_gateway(
            **fake.gateway_config(store),
            rate_limit={"max_requests": 2},
            relay={"allow_hosts": [store], "secret": SECRET},
            upstream={"ca_bundle": str(ca_file)},
        )
        link = await overflow_link(gw.url, None)  # the address's bucket: 1 of 2
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY_A}"}) as client:
            statuses = []
            for _ in range(2):
                async with client.put(link, data=b"{}") as resp:
                    statuses.append(resp.status)
    assert statuses == [200, 429]


def assert_no_secret_logged(lines: list[str], *secrets: str) -> None:
    """Neither a relay token nor a signed URL's signature in any line the gateway wrote."""
    text = "".join(lines)
    assert lines
    for secret in (*secrets, "X-Amz-Signature", "Signature=", "sig="):
        assert secret not in text, secret


async def test_no_path_variant_logs_a_relay_token_or_a_signature(
    tmp_path: Path, store_tls: ssl.SSLContext, ca_file: Path
) -> None:
    """`//_relay/`, `/data-plane/_relay/`, absolute-form `http://gw/_relay/` in forward-proxy mode, and a
    signed URL asked for through the forward proxy: each logged, none with its token or signature."""
    async with FakeBraintrust(store_host=STORE, store_tls=store_tls) as fake:
        store = f"{STORE}:{fake.store_port}"
        config = {
            **fake.gateway_config(store),
            "relay": {"allow_hosts": [store], "secret": SECRET},
            "upstream": {"ca_bundle": str(ca_file)},
            "forward_proxy": {"enabled": True, "http_ports": [fake.store_port]},
        }
        gw = GatewayProcess(config, tmp_path)
        try:
            link = await overflow_link(gw.url, KEY_A)
            token = link.removeprefix(gw.url + "/_relay/")
            signed = fake.signed_url("direct")
            signature = signed.rpartition("=")[2]
            targets = [
                f"/_relay/{token}",
                f"//_relay/{token}",
                f"/data-plane/_relay/{token}",
                f"/data-plane/%5Frelay/{token}",
                f"{gw.url}/_relay/{token}",
                signed.replace("https://", "http://"),  # the signed URL itself, in forward-proxy form
            ]
            for target in targets:
                reply = await get(gw.port, target, f"Host: 127.0.0.1:{gw.port}\r\n")
                assert reply.status in (200, 403, 404, 405, 502), (target, reply)
        finally:
            gw.stop()
    paths = [e["path"] for e in gw.events("access")]
    assert len(paths) == 1 + len(targets), paths  # the slot, then each target
    assert_no_secret_logged(gw.raw_lines, token, signature)


DEEP = b"[" * 5000 + b"]" * 5000  # past the parser's recursion limit
PAST_32 = b'{"a": ' * 40 + b'{"signedUrl": "https://store.test/k?X-Amz-Signature=1"}' + b"}" * 40


async def test_hostile_control_documents_reach_the_client_and_are_audited(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, tmp_path: Path
) -> None:
    """A body nested past any bound, or a signed URL whose expiry is NaN: the upstream's answer, not 500."""
    sink = tmp_path / "audit.jsonl"
    gw = await start_gateway(
        **data_plane(raw_upstream),
        allowlist=[raw_upstream.url.split("://")[1], "store.test"],
        relay={"allow_hosts": ["store.test"], "secret": SECRET},
        audit={"enabled": True, "sink": str(sink)},
    )
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n"
    bodies = []
    async with aiohttp.ClientSession() as client:
        for body in (DEEP, PAST_32):
            raw_upstream.replies["/logs3/overflow"] = head.format(len(body)).encode() + body
            async with client.get(f"{gw.url}/logs3/overflow") as resp:
                bodies.append((resp.status, await resp.read()))
    assert bodies == [(200, DEEP), (200, PAST_32)]  # as they came: nothing in them is read
    for expires in ("nan", "inf", "-inf", "1e999", "x"):
        link = await slot(gw, raw_upstream, f"https://store.test/k?Expires={expires}&Signature=s")
        assert link.startswith(gw.url + "/_relay/"), expires  # relayed, for relay.max_ttl_s
    audited = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [(e["method"], e["status"]) for e in audited] == [("GET", 200)] * 7
