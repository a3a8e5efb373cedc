"""Error codes as values, and the one table that maps each code to an HTTP status.

Policies return a `GatewayError`; I/O edges raise `GatewayFailure` wrapping one. Only `gateway.server`
turns either into a response, so a code is invented here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Code(StrEnum):
    """Stable, lowercase error codes: clients and dashboards key on these strings."""

    BAD_REQUEST = "bad_request"
    BAD_CONNECT_TARGET = "bad_connect_target"
    BAD_HOST = "bad_host"
    AMBIGUOUS_CREDENTIALS = "ambiguous_credentials"
    REQUEST_TIMEOUT = "request_timeout"
    NOT_FOUND = "no_route"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    EGRESS_DENIED = "egress_denied"
    USE_REVERSE_MODE = "use_reverse_mode"
    RELAY_DENIED = "relay_denied"
    PATH_DENIED = "path_denied"
    BAD_PATH = "bad_path"
    PROXY_AUTH_REQUIRED = "proxy_auth_required"
    UNAUTHENTICATED = "unauthenticated"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_AUTH_FAILURES = "too_many_auth_failures"
    RATE_LIMIT_UNAVAILABLE = "rate_limit_unavailable"
    BODY_TOO_LARGE = "body_too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_BAD_ENCODING = "upstream_bad_encoding"
    UPSTREAM_BAD_RESPONSE = "upstream_bad_response"
    UPSTREAM_BUSY = "upstream_busy"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    SHUTTING_DOWN = "shutting_down"
    ADMIN_HOST_DENIED = "admin_host_denied"  # a Host header naming someone else: DNS rebinding
    CROSS_SITE_DENIED = "cross_site_denied"  # a browser's cross-site request or form post to the admin port
    ADMIN_TOKEN_INVALID = "admin_token_invalid"  # missing or wrong `Authorization: Bearer` for admin.token
    ADMIN_TOKEN_NOT_SET = "admin_token_not_set"  # a non-loopback admin listener with no admin.token
    CLIENT_DISCONNECTED = "client_disconnected"
    INTERNAL = "internal_error"


STATUS: dict[Code, int] = {
    Code.BAD_REQUEST: 400,
    Code.BAD_CONNECT_TARGET: 400,
    Code.BAD_HOST: 400,
    Code.AMBIGUOUS_CREDENTIALS: 400,
    Code.REQUEST_TIMEOUT: 408,
    Code.NOT_FOUND: 404,
    Code.METHOD_NOT_ALLOWED: 405,
    Code.EGRESS_DENIED: 403,
    Code.USE_REVERSE_MODE: 403,
    Code.RELAY_DENIED: 403,
    Code.PATH_DENIED: 403,
    Code.BAD_PATH: 400,
    Code.PROXY_AUTH_REQUIRED: 407,
    Code.UNAUTHENTICATED: 401,
    Code.RATE_LIMITED: 429,
    Code.TOO_MANY_AUTH_FAILURES: 429,
    Code.RATE_LIMIT_UNAVAILABLE: 503,
    Code.BODY_TOO_LARGE: 413,
    Code.HEADERS_TOO_LARGE: 431,
    Code.UPSTREAM_UNREACHABLE: 502,
    Code.UPSTREAM_TIMEOUT: 504,
    Code.UPSTREAM_BAD_ENCODING: 502,
    Code.UPSTREAM_BAD_RESPONSE: 502,
    Code.UPSTREAM_BUSY: 503,
    Code.TOO_MANY_CONNECTIONS: 503,
    Code.SHUTTING_DOWN: 503,
    Code.ADMIN_HOST_DENIED: 403,
    Code.CROSS_SITE_DENIED: 403,
    Code.ADMIN_TOKEN_INVALID: 401,
    Code.ADMIN_TOKEN_NOT_SET: 403,
    Code.CLIENT_DISCONNECTED: 499,  # nginx's number: logged only, the client is no longer there to see it
    Code.INTERNAL: 500,
}


# The codes that say the upstream failed (no usable answer), not the policy: counted apart, by route.
UPSTREAM_FAILURES = frozenset(
    {Code.UPSTREAM_UNREACHABLE, Code.UPSTREAM_TIMEOUT, Code.UPSTREAM_BAD_ENCODING, Code.UPSTREAM_BAD_RESPONSE}
)


class Reason(StrEnum):
    """Why, more precisely than the code: logged with every refusal and failure, never sent to clients.

    One code (`egress_denied`, `upstream_unreachable`) covers several causes an operator must tell apart.
    """

    HOST_NOT_ALLOWED = "host_not_allowed"
    PORT_NOT_ALLOWED = "port_not_allowed"  # a CONNECT port outside forward_proxy.connect_ports
    PRIVATE_ADDRESS = "private_address"  # a tunnel name that resolved to a non-public address
    MALFORMED_TARGET = "malformed_target"
    NO_ROUTE = "no_route"
    PATH_DENIED = "path_denied"
    RELAY_TOKEN = "relay_token"  # a /_relay/ link that is forged, altered, expired or used for another method
    CONNECTION_REFUSED = "connection_refused"
    DNS_FAILURE = "dns_failure"
    TLS_VERIFICATION = "tls_verification"
    CONNECT_TIMEOUT = "connect_timeout"
    READ_TIMEOUT = "read_timeout"
    WRITE_TIMEOUT = "write_timeout"  # the upstream stopped taking the request body
    CONNECTION_FAILED = "connection_failed"  # reset, closed early, or another socket error
    BAD_RESPONSE = "bad_response"
    DECOMPRESSION_LIMIT = "decompression_limit"  # a body decoding past rewrite.max_decoded_mb or the ratio
    PROXY_REFUSED = "proxy_refused"  # the corporate proxy (upstream.proxy) refused a CONNECT
    USE_REVERSE_MODE = "use_reverse_mode"  # a tunnel to a host a rate-limited route serves


@dataclass(frozen=True, slots=True)
class GatewayError:
    """A refusal or failure, as a value: what went wrong (`code`) and a human sentence (`detail`).

    `headers` carries the few response headers an error must set (Retry-After, Proxy-Authenticate).
    `reason` and `context` (key/value pairs such as the upstream address) go to the log only. `phrase`
    replaces the status line's reason phrase where that line is all a client shows (a refused CONNECT).
    """

    code: Code
    detail: str
    headers: tuple[tuple[str, str], ...] = ()
    reason: Reason | None = None
    context: tuple[tuple[str, str], ...] = ()
    phrase: str | None = None

    @property
    def status(self) -> int:
        return STATUS[self.code]

    @property
    def why(self) -> str:
        """The log's `reason` field: the precise reason when known, else the code."""
        return str(self.reason or self.code)


class GatewayFailure(Exception):
    """Raised at an I/O edge (connector, body reader) to carry a `GatewayError` up to the server."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(f"{error.code}: {error.detail}")
        self.error = error
