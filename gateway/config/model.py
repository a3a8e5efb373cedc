"""The typed, immutable shape of a gateway config: the user-facing contract of `gateway.yaml`.

Every model forbids unknown keys (a typo is an error, not a silent default) and is frozen, so a loaded
config can be shared by every request and swapped whole on reload.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from yarl import URL

from gateway.config.certs import CertProblem, check_pair
from gateway.policy.allowlist import Allowlist, canonical_host, parse_entry
from gateway.policy.paths import compile_glob
from gateway.policy.proxyauth import ScryptHash
from gateway.policy.storage_uri import parse_storage_uri

Port = Annotated[int, Field(ge=0, le=65535)]
_TOKEN = re.compile(r"[\x21-\x7e]{16,}")
Seconds = Annotated[float, Field(gt=0)]


def _allow_entry(value: str) -> str:
    parse_entry(value)
    return value


AllowEntryText = Annotated[str, AfterValidator(_allow_entry)]


def _glob(value: str) -> str:
    compile_glob(value)
    return value


PathGlob = Annotated[str, AfterValidator(_glob)]


class Section(BaseModel):
    """Base for every config section: strict about keys, immutable once built."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_http_url(value: str, *, allow_path: bool) -> URL:
    """Parse an http(s) origin (optionally with a base path); raise ValueError saying what is wrong."""
    try:
        url = URL(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a URL: {value!r}") from exc
    if url.scheme not in ("http", "https"):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    if not url.raw_host:
        raise ValueError(f"has no host: {value!r}")
    if url.raw_user is not None or url.raw_password is not None:
        raise ValueError(f"must not carry user:password: {value!r}")
    if url.raw_query_string or url.raw_fragment:
        raise ValueError(f"must not carry a query or fragment: {value!r}")
    if not allow_path and url.raw_path not in ("", "/"):
        raise ValueError(f"must be an origin without a path: {value!r}")
    return url


class ListenTls(Section):
    """HTTPS on the proxy listener: a PEM certificate chain and its unencrypted key, checked at load.

    The files are read again on every reload and whenever they change on disk (gateway/listener_tls.py).
    """

    cert_file: str
    key_file: str

    @model_validator(mode="after")
    def _loads(self) -> ListenTls:
        try:
            check_pair(self.cert_file, self.key_file)
        except CertProblem as exc:
            raise KeyedError(("listen", "tls", exc.key), exc.message) from None
        return self


class Listen(Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    tls: ListenTls | None = None  # null: plain HTTP


def read_secret_file(data: object, section: str, key: str) -> object:
    """`<key>_file` (a mounted Kubernetes Secret) read at load into `<key>`, surrounding whitespace stripped;
    setting both is an error. Read again at each reload, so a rotated Secret applies then."""
    file_key = key + "_file"
    if not isinstance(data, dict) or not data.get(file_key):
        return data
    if data.get(key) is not None:
        raise KeyedError((section, file_key), f"set {section}.{key} or {section}.{file_key}, not both")
    path = str(data[file_key])
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise KeyedError((section, file_key), f"cannot read {path}: {reason.lower()}") from None
    return {**data, key: secret}


class Admin(Section):
    """The admin listener. `token` guards its state-changing endpoints (POST /reload); it is never printed.

    `token_file` (a mounted Kubernetes Secret) is read at load and at each reload, so rotating the Secret
    and reloading applies it; `allowed_hosts` are extra names a request's Host may give (a Service name).
    """

    host: str = "127.0.0.1"
    port: Port = 9901
    token: str | None = None  # env BT_GATEWAY_ADMIN_TOKEN
    token_file: str | None = None  # env BT_GATEWAY_ADMIN_TOKEN_FILE; set this or token, not both
    allowed_hosts: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _read_token_file(cls, data: object) -> object:
        return read_secret_file(data, "admin", "token")

    @field_validator("token")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        """Checked without echoing it: a token must never reach an error line or a log."""
        if value is not None and not _TOKEN.fullmatch(value):
            raise KeyedError(
                ("admin", "token"),
                "must be at least 16 printable characters without spaces (e.g. openssl rand -hex 32)",
            )
        return value


def _whole_seconds(minutes: float) -> float:
    seconds = minutes * 60
    if abs(seconds - round(seconds)) > 1e-6 or round(seconds) < 1:
        raise ValueError(f"must be a whole number of seconds (got {seconds:g} s); 0.05 is 3 s")
    return minutes


WindowMinutes = Annotated[float, Field(gt=0), AfterValidator(_whole_seconds)]


OnLimit = Literal["reject", "delay"]


class RouteLimit(Section):
    """A per-route override of the rate limit: each key left out is the global one's; `off` is 0 requests."""

    max_requests: Annotated[int, Field(ge=0)] | None = None
    window_minutes: WindowMinutes | None = None
    on_limit: OnLimit | None = None
    max_delay_s: Seconds | None = None
    max_queued: Annotated[int, Field(ge=1)] | None = None


class RateLimit(Section):
    """Per-token sliding-window limit, Braintrust's OUTBOUND_RATE_LIMIT_* contract."""

    max_requests: Annotated[int, Field(ge=0)] = 100
    window_minutes: WindowMinutes = 1
    strategy: Literal["moving-window", "sliding-window-counter", "fixed-window"] = "moving-window"
    storage: str = "memory://"
    storage_password: str | None = None  # env BT_GATEWAY_RATE_LIMIT_STORAGE_PASSWORD; never printed
    storage_password_file: str | None = None  # a mounted Secret; set this or storage_password, not both
    storage_ca_bundle: str | None = None  # with rediss://: the CA (PEM) the server's certificate chains to
    on_storage_error: Literal["allow", "deny"] = "allow"
    storage_timeout_ms: Annotated[int, Field(ge=1, le=60000)] = 100
    anonymous: Literal["client-ip", "deny"] = "client-ip"
    on_limit: OnLimit = "reject"  # delay: wait for a free slot instead of 429 (uploads lose no data)
    max_delay_s: Seconds = 10  # with delay: the longest wait; beyond it 429 (below shutdown_timeout_s)
    max_queued: Annotated[int, Field(ge=1)] = 100  # with delay: requests waiting per key; beyond it 429

    @model_validator(mode="before")
    @classmethod
    def _read_password_file(cls, data: object) -> object:
        return read_secret_file(data, "rate_limit", "storage_password")

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        parse_storage_uri(value)
        return value

    @model_validator(mode="after")
    def _storage_credentials(self) -> RateLimit:
        """One password, and TLS settings only where TLS is spoken; checked without echoing the password."""
        uri = parse_storage_uri(self.storage)
        if self.storage_password is not None and uri.password is not None:
            raise KeyedError(
                ("rate_limit", "storage"),
                "carries a password and storage_password is set: keep one (the Secret)",
            )
        bundle, key = self.storage_ca_bundle, ("rate_limit", "storage_ca_bundle")
        if bundle is not None:
            if uri.scheme != "rediss":
                raise KeyedError(key, "only applies to a rediss:// storage")
            if not Path(bundle).is_file():
                raise KeyedError(key, f"no such file: {bundle}")
        return self

    @property
    def window_s(self) -> int:
        return round(self.window_minutes * 60)


def limit_off(value: object) -> object:
    """`off` (or YAML `false`) turns a limit off: the same as `max_requests: 0`."""
    if value is False or value == "off":
        return {"max_requests": 0}
    if value is None or isinstance(value, dict | BaseModel):
        return value
    raise ValueError("must be off or a mapping such as {max_requests: 100, window_minutes: 1}")


# enforce: refusals are sent. report: the refusals a step may relax (steps.py `relaxable`) are logged as
# `would_refuse` and counted, and the request goes on; what guards the gateway itself is never relaxed.
Mode = Literal["enforce", "report"]

RESERVED_ROUTE_NAMES = frozenset({"forward_proxy", "tunnel"})  # the gateway's own names for its buckets
_ROUTE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class Route(Section):
    """One reverse-proxy route: requests under `prefix` go to `upstream` with the prefix stripped."""

    name: str
    prefix: str
    upstream: str
    rate_limit: RouteLimit | None = None
    advertise: bool = False
    deny_paths: tuple[PathGlob, ...] = ()  # refused with 403 path_denied; see policy/paths.py
    mode: Mode | None = None  # null: the top-level `mode`

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _ROUTE_NAME.match(value):
            raise ValueError("must be 1-64 letters, digits, '_', '.' or '-'")
        if value in RESERVED_ROUTE_NAMES:
            raise ValueError(f"{value!r} is reserved for the gateway's own use; choose another name")
        return value

    _rate_limit_off = field_validator("rate_limit", mode="before")(limit_off)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value or "#" in value or "//" in value:
            raise ValueError("must start with '/' and hold only a path, e.g. /data-plane")
        return value.rstrip("/") or "/"

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        url = parse_http_url(value, allow_path=True)
        return str(url).rstrip("/")

    @property
    def upstream_url(self) -> URL:
        return URL(self.upstream)


class UpstreamSettings(Section):
    connect_timeout_s: Seconds = 10
    read_timeout_s: Seconds = 300
    write_timeout_s: Seconds = 60  # an upstream taking no request bytes this long: 504, the upload stops
    pool_timeout_s: Seconds = 5  # waiting for a free pooled connection; then 503 upstream_busy
    ca_bundle: str | None = None
    proxy: str | None = None

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ValueError(f"must be an http:// proxy URL, got {value!r}")
        return value


class Limits(Section):
    max_body_mb: Annotated[float, Field(gt=0)] = 512
    max_header_kb: Annotated[int, Field(ge=1, le=1024)] = 64
    max_connections: Annotated[int, Field(ge=1)] = 1024  # pooled upstream connections
    header_timeout_s: Seconds = 10  # a complete request head within this, else 408 and close; with
    # listen.tls also the bound on the handshake before it (the value at start: asyncio fixes it per listener)
    body_timeout_s: Seconds = 60  # no request body byte for this long: 408
    keepalive_timeout_s: Seconds = 75  # an idle client connection is closed after this
    max_client_connections: Annotated[int, Field(ge=1)] = 4096  # beyond: new connections get 503
    max_upstream_share: Annotated[float, Field(gt=0, le=1)] = 0.5  # of max_connections, per client address


class RewriteRule(Section):
    """An extra response rewrite: URL prefix `from` becomes `to` (applied after the built-in rules)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: str = Field(alias="from")
    to: str

    @field_validator("from_", "to")
    @classmethod
    def _url(cls, value: str) -> str:
        return str(parse_http_url(value, allow_path=True)).rstrip("/")


# The endpoints whose bodies hand out URLs, and so are rewritten (read from the Python SDK 0.47.0 and the
# TypeScript SDK 3.35.0); every other body passes byte for byte, so user data is never altered.
DEFAULT_BODY_PATHS = (
    "/api/apikey/login",  # org_info[].api_url / proxy_url / realtime_url: the data plane, advertised back
    "/logs3/overflow",  # signedUrl: the upload slot for a batch over logs3_payload_max_bytes (relayed)
    "/attachment",  # signedUrl (POST, an upload) and downloadUrl (GET) of attachments (relayed)
)


class Rewrite(Section):
    enabled: bool = True
    max_buffer_kb: Annotated[int, Field(ge=1, le=1024)] = 64
    rules: tuple[RewriteRule, ...] = ()
    max_growth_ratio: Annotated[float, Field(ge=1)] = 4  # past it the rest is sent unrewritten
    max_decoded_mb: Annotated[float, Field(gt=0)] = 64  # a compressed body decoding past it passes as is
    max_inflate_ratio: Annotated[float, Field(ge=1)] = 100  # likewise past this many decoded bytes per byte
    body_paths: tuple[PathGlob, ...] = DEFAULT_BODY_PATHS  # the only bodies rewritten (upstream paths)


class AuditSettings(Section):
    """Braintrust audit headers: asked of every upstream, written as one event per request."""

    enabled: bool = False
    sink: str = "stdout"  # or a file path: JSON lines, appended; reopened on SIGHUP (log rotation)
    expose_to_client: Literal["auto", "always", "never"] = "auto"

    @field_validator("sink")
    @classmethod
    def _sink(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be stdout or a file path")
        return value


class Relay(Section):
    """The signed-URL relay for object-store uploads and downloads (see gateway/relay.py)."""

    # Object-store hosts to relay (list them in allowlist too): https only; an entry without a port is
    # port 443, one with a port that port.
    allow_hosts: tuple[AllowEntryText, ...] = ()
    secret: str | None = None  # HMAC key for relay links (env BT_GATEWAY_RELAY_SECRET); random per process
    max_ttl_s: Seconds = 3600  # a relay link lives as long as its signed URL, and never longer than this

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 32:
            raise ValueError("must be at least 32 characters (use a random value shared by all replicas)")
        return value


class Logging(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class TunnelRate(Section):
    """New CONNECT tunnels per client address (tokens travel inside TLS, so the address is the key)."""

    max_tunnels: Annotated[int, Field(ge=0)] = 60
    window_minutes: WindowMinutes = 1

    @property
    def window_s(self) -> int:
        return round(self.window_minutes * 60)


class ProxyAuthConfig(Section):
    users: dict[str, str]
    max_failures_per_minute: Annotated[int, Field(ge=1)] = 10  # per client address; then 429 until it ages

    @field_validator("users")
    @classmethod
    def _users(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("at least one user is required (or set auth: null)")
        for name, text in value.items():
            if ":" in name or not name:
                raise ValueError(f"user name {name!r} must be non-empty and contain no ':'")
            try:
                ScryptHash.parse(text)
            except ValueError as exc:
                raise ValueError(f"users.{name}: {exc}") from None
        return value


class ForwardProxy(Section):
    """HTTPS_PROXY mode on the same port: CONNECT tunnels and absolute-form requests, allow-listed."""

    enabled: bool = True
    connect_ports: tuple[Port, ...] = (443,)
    http_ports: tuple[Port, ...] = (80,)  # absolute-form (plain HTTP) requests only to these ports
    tunnel_to_limited_hosts: Literal["allow", "deny"] = "allow"  # CONNECT to a rate-limited route's host
    idle_timeout_s: Seconds = 300
    auth: ProxyAuthConfig | None = None
    rate_limit: TunnelRate = TunnelRate()
    deny_private_addresses: bool = False


def _resolve_address(value: str) -> str:
    try:
        return ipaddress.ip_address(value).compressed
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


def default_routes() -> tuple[Route, ...]:
    """Braintrust's hosted planes: the app (control plane) and the data plane, advertised back through
    the gateway and shaped rather than refused (a refused upload is a lost batch)."""
    return (
        Route(name="app", prefix="/", upstream="https://www.braintrust.dev"),
        Route(
            name="data",
            prefix="/data-plane",
            upstream="https://api.braintrust.dev",
            advertise=True,
            rate_limit=RouteLimit(on_limit="delay"),
        ),
    )


class GatewayConfig(Section):
    """The whole config. Cross-field rules (allow-listed upstreams, unique routes) are checked here."""

    listen: Listen = Listen()
    admin: Admin = Admin()
    public_url: str = "https://www.braintrust.dev"
    allowlist: tuple[AllowEntryText, ...] = ("www.braintrust.dev", "braintrust.dev", "api.braintrust.dev")
    routes: tuple[Route, ...] = Field(default_factory=default_routes)
    upstream: UpstreamSettings = UpstreamSettings()
    limits: Limits = Limits()
    logging: Logging = Logging()
    shutdown_timeout_s: Annotated[float, Field(ge=0)] = 15
    shutdown_delay_s: Annotated[float, Field(ge=0)] = 0
    forward_proxy: ForwardProxy = ForwardProxy()
    rate_limit: RateLimit = RateLimit()
    rewrite: Rewrite = Rewrite()
    audit: AuditSettings = AuditSettings()
    relay: Relay = Relay()
    advertise_url: str | None = None
    trusted_proxies: tuple[str, ...] = ()
    deny_paths: tuple[PathGlob, ...] = ()  # for every route; DISABLE_SYSADMIN_TELEMETRY adds /brainstore/**
    workers: Annotated[int, Field(ge=1, le=256)] = 1  # processes sharing the listen port (SO_REUSEPORT)
    mode: Mode = "enforce"  # routes[].mode wins; tunnels and requests not yet routed follow this one

    _rate_limit_off = field_validator("rate_limit", mode="before")(limit_off)

    @field_validator("advertise_url")
    @classmethod
    def _advertise_url(cls, value: str | None) -> str | None:
        return None if value is None else str(parse_http_url(value, allow_path=True)).rstrip("/")

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP address or CIDR network") from None
        return value

    resolve: dict[str, Annotated[str, AfterValidator(_resolve_address)]] = Field(default_factory=dict)

    @field_validator("resolve")
    @classmethod
    def _resolve(cls, value: dict[str, str]) -> dict[str, str]:
        out = {}
        for name, address in value.items():
            canonical = canonical_host(name)
            if canonical is None:
                raise ValueError(f"{name!r} is not a host name")
            out[canonical] = address
        return out

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        return str(parse_http_url(value, allow_path=True)).rstrip("/")

    @model_validator(mode="after")
    def _routes_are_reachable(self) -> GatewayConfig:
        if not self.routes:
            raise ValueError("routes: at least one route is required")
        allow = Allowlist.parse(self.allowlist)
        seen_names: set[str] = set()
        seen_prefixes: set[str] = set()
        for index, route in enumerate(self.routes):
            if route.name in seen_names:
                raise RouteError(index, "name", f"duplicate route name {route.name!r}")
            if route.prefix in seen_prefixes:
                raise RouteError(index, "prefix", f"duplicate route prefix {route.prefix!r}")
            seen_names.add(route.name)
            seen_prefixes.add(route.prefix)
            url = route.upstream_url
            if not allow.allows(url.host, url.port or 0):
                raise RouteError(index, "upstream", f"host {url.host!r} is not on the allowlist")
        return self

    @model_validator(mode="after")
    def _advertised_over_tls(self) -> GatewayConfig:
        """A TLS listener must not send SDKs back to itself in cleartext: they would fail, or fall back."""
        if (
            self.listen.tls is not None
            and self.advertise_url
            and not self.advertise_url.startswith("https://")
        ):
            raise KeyedError(("advertise_url",), "must be an https:// URL when listen.tls is set")
        return self

    @model_validator(mode="after")
    def _workers_share_what_they_must(self) -> GatewayConfig:
        """Several workers need one limit (a shared store) and one port to share (not a random one)."""
        if self.workers > 1 and self.rate_limit.storage == "memory://":
            raise KeyedError(
                ("workers",),
                "more than 1 needs a shared rate_limit.storage (redis://...): with memory:// "
                "each worker would count on its own and allow that many times the limit",
            )
        if self.workers > 1 and self.listen.port == 0:
            raise KeyedError(("workers",), "more than 1 needs a fixed listen.port (0 picks one per worker)")
        return self

    def route(self, name: str) -> Route | None:
        return next((r for r in self.routes if r.name == name), None)

    @property
    def reported_routes(self) -> tuple[str, ...]:
        """The routes in report mode, their own setting or the top-level one."""
        return tuple(r.name for r in self.routes if (r.mode or self.mode) == "report")


class KeyedError(ValueError):
    """A cross-field error about one key; carries its key path so the loader can report it precisely."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


class RouteError(KeyedError):
    def __init__(self, index: int, key: str, message: str) -> None:
        super().__init__(("routes", index, key), message)
