"""Header policy for a hop: what is dropped (hop-by-hop) and what a proxy adds (X-Forwarded-*, Via).

RFC 9110 7.6.1: Connection and every header it names apply to one hop only and must not be forwarded.
Field names are case-insensitive, so every comparison is on the lowercased name.

A relay transfer (gateway/relay.py) goes to an object store, not to Braintrust: it carries only what
describes the transfer (`TRANSFER`, and the stores' own `x-amz-`/`x-goog-`/`x-ms-` fields), never the
client's credentials (Authorization, Cookie), nor who or where the client is (X-Forwarded-*, Forwarded).
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
# The fields a hop appends its own value to (lowercase -> as sent): the sender's values come first, folded.
_FOLDED = {
    "x-forwarded-for": "X-Forwarded-For",
    "x-forwarded-proto": "X-Forwarded-Proto",
    "x-forwarded-host": "X-Forwarded-Host",
    "via": "Via",
}
_APPENDED = frozenset(_FOLDED)
_REQUEST_DROP = HOP_BY_HOP | _APPENDED | {"host", "expect", "x-request-id"}
_VIA = frozenset(("via",))  # the one a response's hop appends to
_RESPONSE_DROP = HOP_BY_HOP | _VIA | {"x-request-id"}  # our request id replaces the upstream's

# What a signed upload or download needs: the body's description, ranges and preconditions.
TRANSFER = frozenset(
    (
        "content-type",
        "content-length",
        "content-md5",
        "content-encoding",
        "content-disposition",
        "content-language",
        "cache-control",
        "expires",
        "accept",
        "accept-encoding",
        "range",
        "content-range",  # a resumable or chunked upload's part (GCS, Azure)
        "x-upload-content-type",  # GCS JSON-API resumable uploads announce the object this way
        "x-upload-content-length",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "if-range",
    )
)
STORE_PREFIXES = ("x-amz-", "x-goog-", "x-ms-")  # S3, GCS, Azure: headers a signature may cover

Headers = CIMultiDictProxy[str] | CIMultiDict[str]
Fields = list[tuple[str, str]]
Carried = dict[str, list[str]]  # lowercase name -> the sender's values, in order
_NONE_NAMED: frozenset[str] = frozenset()


# `Connection` as nearly every message spells it, looked up rather than parsed.
_COMMON_CONNECTION = {
    spelling: frozenset((spelling.lower(),))
    for spelling in ("keep-alive", "Keep-Alive", "close", "Close", "Upgrade", "upgrade")
}


def _connection_named(headers: Headers) -> frozenset[str]:
    """The fields the sender made hop-by-hop by naming them in Connection (lowercase)."""
    connection = headers.getall("Connection", ())
    if not connection:
        return _NONE_NAMED
    if len(connection) == 1 and (common := _COMMON_CONNECTION.get(connection[0])) is not None:
        return common
    return frozenset(token.strip().lower() for value in connection for token in value.split(","))


def _end_to_end(headers: Headers, drop: frozenset[str], folded: frozenset[str]) -> tuple[Fields, Carried]:
    """One pass over a message's fields: those that travel to the next hop (not hop-by-hop, not named in
    Connection, not in `drop`), and, in order, the values of the `folded` ones this hop appends to."""
    named = _connection_named(headers) if "Connection" in headers else _NONE_NAMED
    fields: Fields = []
    carried: Carried = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in named:
            continue
        if lower not in drop:
            fields.append((name, value))
        elif lower in folded:
            carried.setdefault(lower, []).append(value)
    return fields, carried


def upstream_request_headers(
    headers: CIMultiDictProxy[str],
    *,
    host_header: str,
    client_ip: str,
    client_host: str | None,
    scheme: str,
    request_id: str,
) -> Fields:
    """Headers to send upstream: end-to-end ones, upstream's Host, appended X-Forwarded-* and Via."""
    fields, carried = _end_to_end(headers, _REQUEST_DROP, _APPENDED)
    fields += (
        ("Host", host_header),
        _folded(carried, "x-forwarded-for", client_ip),
        _folded(carried, "x-forwarded-proto", scheme),
    )
    if client_host:
        fields.append(_folded(carried, "x-forwarded-host", client_host))
    else:
        fields += (("X-Forwarded-Host", value) for value in carried.get("x-forwarded-host", ()))
    fields += (_folded(carried, "via", VIA), ("X-Request-Id", request_id))
    return fields


def relay_request_headers(headers: CIMultiDictProxy[str], *, host_header: str, request_id: str) -> Fields:
    """Headers to send an object store: the transfer's own fields, its Host, Via and our request id."""
    named = _connection_named(headers)
    fields = [
        (name, value)
        for name, value in headers.items()
        if ((lower := name.lower()) in TRANSFER or lower.startswith(STORE_PREFIXES)) and lower not in named
    ]
    fields += (("Host", host_header), ("Via", VIA), ("X-Request-Id", request_id))
    return fields


def downstream_response_headers(headers: CIMultiDictProxy[str], request_id: str) -> Fields:
    """Headers to send the client: end-to-end ones from upstream, plus Via and our request id."""
    fields, carried = _end_to_end(headers, _RESPONSE_DROP, _VIA)
    fields += (_folded(carried, "via", VIA), ("X-Request-Id", request_id))
    return fields


def _folded(carried: Carried, lower: str, value: str) -> tuple[str, str]:
    """`value` appended to a comma list header, repeated fields folded into one (RFC 9110 5.3)."""
    existing = carried.get(lower)
    return (_FOLDED[lower], ", ".join((*existing, value)) if existing else value)
