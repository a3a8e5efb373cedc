"""Route selection: the longest configured prefix that matches on a path-segment boundary.

`/data-plane` matches `/data-plane` and `/data-plane/v1/x`, never `/data-planex`. Matching is on the raw
(still percent-encoded) path, and the prefix is stripped from that raw path, so what the upstream receives
is byte-for-byte what the client sent after the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from yarl import URL


@dataclass(frozen=True, slots=True)
class RouteTarget:
    """A compiled route: where its requests go, parsed once at start-up."""

    name: str
    prefix: str
    scheme: str
    host: str
    port: int
    base_path: str
    advertise: bool = False
    host_header: str = field(init=False, repr=False, compare=False)  # the Host upstream: asked per request

    def __post_init__(self) -> None:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "host_header", host if self.port == default else f"{host}:{self.port}")

    @classmethod
    def from_url(cls, name: str, prefix: str, upstream: str, advertise: bool = False) -> RouteTarget:
        url = URL(upstream)
        assert url.raw_host is not None and url.port is not None
        return cls(
            name=name,
            prefix=prefix,
            scheme=url.scheme,
            host=url.raw_host,
            port=url.port,
            base_path=url.raw_path.rstrip("/"),
            advertise=advertise,
        )

    def url_for(self, raw_path: str, raw_query: str) -> URL:
        """The upstream URL for a raw request path; `encoded=True` keeps `//x` a path, never a host."""
        rest = raw_path[len(self.prefix) :] if self.prefix != "/" else raw_path
        path = self.base_path + (rest if rest.startswith("/") else "/" + rest)
        return URL.build(
            scheme=self.scheme,
            host=f"[{self.host}]" if ":" in self.host else self.host,  # encoded form: IPv6 in brackets
            port=self.port,
            path=path,
            query_string=raw_query,
            encoded=True,
        )

    def relative_path(self, url: URL) -> str:
        """The upstream URL's raw path below the route's base path: what `deny_paths` patterns match."""
        return url.raw_path[len(self.base_path) :] or "/"


class RouteTable:
    """Longest-prefix lookup over a handful of routes; built once, read by every request."""

    __slots__ = ("_routes",)

    def __init__(self, routes: tuple[RouteTarget, ...]) -> None:
        self._routes = tuple(sorted(routes, key=lambda r: len(r.prefix), reverse=True))

    @property
    def routes(self) -> tuple[RouteTarget, ...]:
        return self._routes

    def match(self, raw_path: str) -> RouteTarget | None:
        for route in self._routes:
            prefix = route.prefix
            if prefix in ("/", raw_path) or raw_path.startswith(prefix + "/"):
                return route
        return None
