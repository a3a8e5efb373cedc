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
_APPENDED = frozenset(("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via"))  # folded, last
_REQUEST_DROP = HOP_BY_HOP | _APPENDED | {"host", "expect", "x-request-id"}
_RESPONSE_DROP = HOP_BY_HOP | {"via", "x-request-id"}  # our request id replaces the upstream's

Headers = CIMultiDictProxy[str] | CIMultiDict[str]
Fields = list[tuple[str, str]]


def _end_to_end(headers: Headers, drop: frozenset[str]) -> Fields:
    """The fields that travel to the next hop: not hop-by-hop, not named in Connection, not in `drop`."""
    connection = headers.getall("Connection", ())
    if connection:
        named = {token.strip().lower() for value in connection for token in value.split(",")}
        drop = drop | named
    return [(name, value) for name, value in headers.items() if name.lower() not in drop]


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
    fields = _end_to_end(headers, _REQUEST_DROP)
    fields += (
        ("Host", host_header),
        _appended(headers, "X-Forwarded-For", client_ip),
        _appended(headers, "X-Forwarded-Proto", scheme),
    )
    if client_host:
        fields.append(_appended(headers, "X-Forwarded-Host", client_host))
    else:
        fields += (("X-Forwarded-Host", value) for value in headers.getall("X-Forwarded-Host", ()))
    fields += (_appended(headers, "Via", VIA), ("X-Request-Id", request_id))
    return CIMultiDict(fields)


def downstream_response_headers(headers: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    """Headers to send the client: end-to-end ones from upstream, plus Via and our request id."""
    fields = _end_to_end(headers, _RESPONSE_DROP)
    fields += (_appended(headers, "Via", VIA), ("X-Request-Id", request_id))
    return CIMultiDict(fields)


def _appended(headers: Headers, name: str, value: str) -> tuple[str, str]:
    """`value` appended to a comma list header, repeated fields folded into one (RFC 9110 5.3)."""
    existing = headers.getall(name, ())
    return (name, ", ".join((*existing, value)) if existing else value)
