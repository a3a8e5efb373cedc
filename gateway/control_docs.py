"""The SDKs' control documents (login, upload slots, attachments): what in them routes around the gateway.

These small JSON answers hand the SDK the URLs it calls next. Signed object-store URLs become relay links
where `relay.allow_hosts` allows (gateway/relay.py); every URL that would still send the SDK somewhere
other than the gateway is returned as a `Bypass`, so that it is said, not silent:
- a login's `org_info[].api_url` / `proxy_url` that no advertised route rewrote to the gateway's URL;
- a `signedUrl` / `downloadUrl` left as it is.
"""

from __future__ import annotations

from typing import Any

from yarl import URL

from gateway.bypass import DATA_PLANE_NOT_ROUTED, RELAY_HOST_NOT_ALLOWED, Bypass
from gateway.relay import URL_KEYS, Relay, signed_urls

DATA_PLANE_KEYS = ("api_url", "proxy_url")  # where a login response names the data plane
RELAY_HINT = (
    "list it in relay.allow_hosts (https only; with its port unless 443) and the allowlist, "
    "so the SDK's transfer goes through the gateway"
)


def inspect(
    doc: Any, gateway_url: str, relay: Relay | None, route: str, *, token_digest: str | None
) -> tuple[bool, list[Bypass]]:
    """Put relay links into `doc` (in place), for the caller whose token has `token_digest`; return whether
    it changed, and the ways around left in it (each event and host once per document)."""
    changed, found = False, []
    for node, key in signed_urls(doc):
        url = node[key]
        link = relay.link(url, URL_KEYS[key], route, gateway_url, token_digest) if relay is not None else None
        if link is not None:
            node[key], changed = link, True
        elif host := _host(url):
            found.append(Bypass(RELAY_HOST_NOT_ALLOWED, host, RELAY_HINT))
    for url in _data_plane_urls(doc):
        if url != gateway_url and not url.startswith(gateway_url + "/") and (host := _host(url)):
            origin = str(URL(url).origin())
            found.append(
                Bypass(
                    DATA_PLANE_NOT_ROUTED,
                    host,
                    f"route it through the gateway: BT_GATEWAY_DATA_PLANE_URL={origin}, or in routes: "
                    f"{{name: data, prefix: /data-plane, upstream: {origin}, advertise: true}} "
                    f"(and {host} in the allowlist)",
                )
            )
    return changed, list(dict.fromkeys(found))


def _data_plane_urls(doc: Any) -> list[str]:
    if not isinstance(doc, dict) or not isinstance(orgs := doc.get("org_info"), list):
        return []
    return [
        url
        for org in orgs
        if isinstance(org, dict)
        for key in DATA_PLANE_KEYS
        if isinstance(url := org.get(key), str)
    ]


def _host(url: str) -> str | None:
    """The URL's host, bounded for the log, or None when it is not an absolute http(s) URL."""
    try:
        parsed = URL(url)
    except ValueError:
        return None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        return None
    return parsed.raw_host[:255]
