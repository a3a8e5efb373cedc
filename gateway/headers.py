"""Header policy for a hop: what is dropped (hop-by-hop) and what a proxy adds (X-Forwarded-*, Via).

RFC 9110 7.6.1: Connection and every header it names apply to one hop only and must not be forwarded.
Field names are case-insensitive, so every comparison is on the lowercased name.
"""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    )
)
VIA = "1.1 bt-gateway"
_REQUEST_DROP = HOP_BY_HOP | {"host", "expect", "x-request-id"}
_RESPONSE_DROP = HOP_BY_HOP | {"x-request-id"}  # ours replaces the upstream's

Headers = CIMultiDictProxy[str] | CIMultiDict[str]


def _end_to_end(headers: Headers, drop: frozenset[str]) -> CIMultiDict[str]:
    """The fields that travel to the next hop: not hop-by-hop, not named in Connection, not in `drop`."""
    connection = headers.getall("Connection", ())
    if connection:
        named = {token.strip().lower() for value in connection for token in value.split(",")}
        drop = drop | named
    return CIMultiDict([(name, value) for name, value in headers.items() if name.lower() not in drop])


def upstream_request_headers(
    headers: CIMultiDictProxy[str],
    *,
    host_header: str,
    client_ip: str,
    client_host: str | None,
    scheme: str,
    request_id: str,
) -> CIMultiDict[str]:
    """Headers to send upstream: end-to-end ones, upstream's Host, appended X-Forwarded-* and Via."""
    out = _end_to_end(headers, _REQUEST_DROP)
    out["Host"] = host_header
    _append(out, "X-Forwarded-For", client_ip)
    _append(out, "X-Forwarded-Proto", scheme)
    if client_host:
        _append(out, "X-Forwarded-Host", client_host)
    _append(out, "Via", VIA)
    out["X-Request-Id"] = request_id
    return out


def downstream_response_headers(headers: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    """Headers to send the client: end-to-end ones from upstream, plus Via and our request id."""
    out = _end_to_end(headers, _RESPONSE_DROP)
    _append(out, "Via", VIA)
    out["X-Request-Id"] = request_id
    return out


def _append(headers: CIMultiDict[str], name: str, value: str) -> None:
    """Append to a comma list header, folding repeated fields into one (RFC 9110 5.3)."""
    if name not in headers:
        headers[name] = value
        return
    existing = headers.popall(name)
    headers[name] = ", ".join((*existing, value))
