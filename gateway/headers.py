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
_APPENDED = frozenset(("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via"))  # folded, last
_REQUEST_DROP = HOP_BY_HOP | _APPENDED | {"host", "expect", "x-request-id"}
_RESPONSE_DROP = HOP_BY_HOP | {"via", "x-request-id"}  # our request id replaces the upstream's

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
_NONE_NAMED: frozenset[str] = frozenset()
# The lowercase names `upstream_request_headers` folds our values into, and the field it appends them as.
_FOLDED = {
    "x-forwarded-for": "X-Forwarded-For",
    "x-forwarded-proto": "X-Forwarded-Proto",
    "x-forwarded-host": "X-Forwarded-Host",
    "via": "Via",
}


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


def upstream_request_headers(
    headers: CIMultiDictProxy[str],
    *,
    host_header: str,
    client_ip: str,
    client_host: str | None,
    scheme: str,
    request_id: str,
) -> Fields:
    """Headers to send upstream: end-to-end ones, upstream's Host, appended X-Forwarded-* and Via.

    One pass over the client's fields (this runs on every request): what is dropped is dropped, what we
    append to is collected, in order, for folding.
    """
    named = _connection_named(headers) if "Connection" in headers else _NONE_NAMED
    fields: Fields = []
    carried: dict[str, list[str]] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in named:
            continue
        if lower not in _REQUEST_DROP:
            fields.append((name, value))
        elif lower in _FOLDED:
            carried.setdefault(lower, []).append(value)
    if not carried:  # most requests: nothing to fold
        fields += (
            ("Host", host_header),
            ("X-Forwarded-For", client_ip),
            ("X-Forwarded-Proto", scheme),
        )
        if client_host:
            fields.append(("X-Forwarded-Host", client_host))
        fields += (("Via", VIA), ("X-Request-Id", request_id))
        return fields
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
    named = _connection_named(headers) if "Connection" in headers else _NONE_NAMED
    fields: Fields = []
    vias: list[str] = []
    for name, value in headers.items():
        lower = name.lower()
        if lower in named:
            continue
        if lower not in _RESPONSE_DROP:
            fields.append((name, value))
        elif lower == "via":
            vias.append(value)
    vias.append(VIA)
    fields += (("Via", ", ".join(vias)), ("X-Request-Id", request_id))
    return fields


def _folded(carried: dict[str, list[str]], lower: str, value: str) -> tuple[str, str]:
    """`value` appended to a comma list header, repeated fields folded into one (RFC 9110 5.3)."""
    existing = carried.get(lower)
    return (_FOLDED[lower], ", ".join((*existing, value)) if existing else value)
