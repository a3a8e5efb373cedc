"""Header policy for a hop: what is dropped (hop-by-hop) and what a proxy adds (X-Forwarded-*, Via).

RFC 9110 7.6.1: Connection and every header it names apply to one hop only and must not be forwarded.
"""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy, istr

HOP_BY_HOP = frozenset(
    istr(h)
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
VIA = "1.1 bt-gateway"
_REQUEST_ONLY_DROP = frozenset(istr(h) for h in ("Host", "Expect", "X-Request-Id"))


def _connection_named(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def _copy_end_to_end(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], extra_drop: frozenset[istr]
) -> CIMultiDict[str]:
    named = _connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name in HOP_BY_HOP or name in extra_drop or name.lower() in named:
            continue
        out.add(name, value)
    return out


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
    out = _copy_end_to_end(headers, _REQUEST_ONLY_DROP)
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
    out = _copy_end_to_end(headers, frozenset())
    _append(out, "Via", VIA)
    out["X-Request-Id"] = request_id
    return out


def _append(headers: CIMultiDict[str], name: str, value: str) -> None:
    """Append to a comma list header, folding repeated fields into one (RFC 9110 5.3)."""
    existing = headers.getall(name, ())
    if existing:
        del headers[name]
        headers[name] = ", ".join((*existing, value))
    else:
        headers[name] = value
