"""Forward-proxy decisions without I/O: CONNECT target grammar, tunnel policy, proxy auth, tunnel rate."""

from __future__ import annotations

import base64
import hashlib

import pytest

from gateway.config.model import GatewayConfig
from gateway.errors import Code, GatewayError, Reason
from gateway.exchange import TUNNEL_ROUTE
from gateway.generation import tunnel_limit_settings
from gateway.policy import proxyauth
from gateway.policy.allowlist import Allowlist
from gateway.policy.forward_proxy import ConnectTarget, ForwardProxyPolicy, parse_connect_target
from gateway.policy.proxyauth import REALM_HEADER, ProxyAuth, ScryptHash, hash_password
from gateway.policy.ratelimit import RateLimiter

# --- parse_connect_target ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "host", "port", "authority"),
    [
        ("api.braintrust.dev:443", "api.braintrust.dev", 443, "api.braintrust.dev:443"),
        ("API.Braintrust.DEV.:8443", "api.braintrust.dev", 8443, "api.braintrust.dev:8443"),
        ("127.0.0.1:1", "127.0.0.1", 1, "127.0.0.1:1"),
        ("localhost:65535", "localhost", 65535, "localhost:65535"),
        ("[::1]:443", "::1", 443, "[::1]:443"),
        ("[2001:DB8:0:0::1]:443", "2001:db8::1", 443, "[2001:db8::1]:443"),
        ("bücher.de:443", "xn--bcher-kva.de", 443, "xn--bcher-kva.de:443"),
    ],
)
def test_parse_connect_target_accepts(target: str, host: str, port: int, authority: str) -> None:
    parsed = parse_connect_target(target)
    assert parsed == ConnectTarget(host, port)
    assert isinstance(parsed, ConnectTarget) and parsed.authority == authority


@pytest.mark.parametrize(
    "target",
    [
        "",
        "evil.com",  # no port
        ":443",  # no host
        "evil.com:",
        "braintrust.dev:443@evil.com:443",  # userinfo
        "user@braintrust.dev:443",
        "::1:443",  # bare IPv6
        "::1",
        "[::1]",  # bracketed, no port
        "[::1]443",
        "[::1:443",
        "[::1]:",
        "[not-an-ip]:443",
        "[127.0.0.1]:443",  # brackets are for IPv6 only
        "[fe80::1%25eth0]:443",  # zone id
        "evil.com:0",
        "evil.com:65536",
        "evil.com:123456",
        "evil.com:-1",
        "evil.com:+443",
        "evil.com: 443",
        "evil.com:443 ",
        "evil.com:0x1bb",
        "evil.com:443/x",
        "evil.com:443?x",
        "evil.com:443#x",
        "evil.com\\x:443",
        "http://evil.com:443",
        "evil com:443",
        "evil\tcom:443",
        "a:b:443",
        "under_score.com:443",
        "-leading.com:443",
        "a..b:443",
    ],
)
def test_parse_connect_target_refuses(target: str) -> None:
    parsed = parse_connect_target(target)
    assert isinstance(parsed, GatewayError)
    assert parsed.code is Code.BAD_CONNECT_TARGET
    assert parsed.status == 400


@pytest.mark.parametrize(
    "target", ["evil.com:\u00b3", "evil.com:\u0664\u0664\u0663", "evil.com:\uff14\uff14\uff13"]
)
def test_parse_connect_target_refuses_non_ascii_port_digits(target: str) -> None:
    parsed = parse_connect_target(target)  # str.isdigit() alone: '³' made int() raise, '٤٤٣' parsed as 443
    assert isinstance(parsed, GatewayError) and parsed.code is Code.BAD_CONNECT_TARGET


# --- ForwardProxyPolicy --------------------------------------------------------------------------------


def policy(
    entries: list[str], ports: tuple[int, ...] = (443,), deny_private: bool = False
) -> ForwardProxyPolicy:
    return ForwardProxyPolicy(Allowlist.parse(entries), ports, deny_private)


def target(text: str) -> ConnectTarget:
    parsed = parse_connect_target(text)
    assert isinstance(parsed, ConnectTarget)
    return parsed


def test_check_target_needs_allow_list_and_port() -> None:
    p = policy(["api.braintrust.dev", "*.braintrust.dev", "pinned.example.com:8443"], ports=(443, 8443))
    assert p.check_target(target("api.braintrust.dev:443")) is None
    assert p.check_target(target("API.braintrust.dev.:8443")) is None
    assert p.check_target(target("x.y.braintrust.dev:443")) is None
    assert p.check_target(target("pinned.example.com:8443")) is None
    for denied in (
        "api.braintrust.dev:22",  # listed host, port not in connect_ports
        "x.braintrust.dev:80",
        "pinned.example.com:443",  # in connect_ports, but the entry pins 8443
        "braintrust.dev.evil.com:443",
        "evilbraintrust.dev:443",
        "127.0.0.1:443",  # IP literals match only when listed literally
        "[::1]:443",
    ):
        error = p.check_target(target(denied))
        assert isinstance(error, GatewayError), denied
        assert error.code is Code.EGRESS_DENIED and error.status == 403


def test_check_target_ip_literal_when_listed() -> None:
    p = policy(["127.0.0.1", "[::1]"], ports=(443,))
    assert p.check_target(target("127.0.0.1:443")) is None
    assert p.check_target(target("[::1]:443")) is None
    assert p.check_target(target("[0:0::1]:443")) is None
    assert p.check_target(target("127.0.0.2:443")) is not None


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "fe80::1"]
)
def test_check_address_without_deny_private_allows_everything(address: str) -> None:
    assert policy(["api.braintrust.dev"]).check_address("api.braintrust.dev", address) is None


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fd00::1",
        "::ffff:127.0.0.1",
    ],
)
def test_check_address_with_deny_private_refuses_non_public(address: str) -> None:
    checks = policy(["api.braintrust.dev", "*.braintrust.dev"], deny_private=True)
    error = checks.check_address("api.braintrust.dev", address)
    assert isinstance(error, GatewayError)
    assert error.code is Code.EGRESS_DENIED and error.reason is Reason.PRIVATE_ADDRESS
    assert "api.braintrust.dev" in error.detail
    assert address not in error.detail  # the log has the address, the client does not


@pytest.mark.parametrize("address", ["8.8.8.8", "104.18.0.1", "2606:4700::1111"])
def test_check_address_with_deny_private_allows_public(address: str) -> None:
    checks = policy(["api.braintrust.dev"], deny_private=True)
    assert checks.check_address("api.braintrust.dev", address) is None


def test_check_address_allows_a_private_address_listed_literally() -> None:
    p = policy(["api.braintrust.dev", "127.0.0.1", "10.0.0.7:443", "[::1]"], deny_private=True)
    assert p.check_address("h.example", "127.0.0.1") is None
    assert p.check_address("h.example", "10.0.0.7") is None  # listed with a port: still the literal
    assert p.check_address("h.example", "::1") is None
    assert p.check_address("h.example", "0:0:0:0:0:0:0:1") is None  # compared in compressed form
    assert p.check_address("h.example", "127.0.0.2") is not None
    assert p.check_address("h.example", "10.0.0.8") is not None


# --- ScryptHash / hash_password ------------------------------------------------------------------------


def test_hash_password_round_trip() -> None:
    text = hash_password("correct horse", log2_n=10)
    parsed = ScryptHash.parse(text)
    assert (parsed.log2_n, parsed.r, parsed.p) == (10, 8, 1)
    assert len(parsed.salt) == 16 and len(parsed.key) == 32
    assert parsed.verify("correct horse")
    assert not parsed.verify("correct horse ")
    assert not parsed.verify("")
    assert hash_password("correct horse", log2_n=10) != text  # salted


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


SALT, KEY = _b64(b"s" * 16), _b64(b"k" * 32)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must look like"),
        ("scrypt$10$8$1$" + SALT, "must look like"),
        (f"bcrypt$10$8$1${SALT}${KEY}", "must look like"),
        (f"scrypt$10$8$1${SALT}${KEY}$extra", "must look like"),
        (f"scrypt$ten$8$1${SALT}${KEY}", "is not a valid scrypt hash"),
        (f"scrypt$10$8$1$not base64!${KEY}", "is not a valid scrypt hash"),
        (f"scrypt$10$8$1${SALT}$@@@@", "is not a valid scrypt hash"),
        (f"scrypt$9$8$1${SALT}${KEY}", "out of range"),
        (f"scrypt$21$8$1${SALT}${KEY}", "out of range"),
        (f"scrypt$10$0$1${SALT}${KEY}", "out of range"),
        (f"scrypt$10$33$1${SALT}${KEY}", "out of range"),
        (f"scrypt$10$8$0${SALT}${KEY}", "out of range"),
        (f"scrypt$10$8$17${SALT}${KEY}", "out of range"),
        (f"scrypt$10$8$1$${KEY}", "out of range"),  # empty salt
        (f"scrypt$10$8$1${SALT}${_b64(b'k' * 15)}", "out of range"),  # key too short
    ],
)
def test_scrypt_hash_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScryptHash.parse(text)


# --- ProxyAuth -----------------------------------------------------------------------------------------


PASSWORD = "s3cret:with-colon"


@pytest.fixture(scope="module")
def alice_hash() -> ScryptHash:
    return ScryptHash.parse(hash_password(PASSWORD, log2_n=10))


def basic(user: str, password: str) -> str:
    return "Basic " + _b64(f"{user}:{password}".encode())


def assert_challenge(result: str | GatewayError) -> None:
    assert isinstance(result, GatewayError)
    assert result.code is Code.PROXY_AUTH_REQUIRED and result.status == 407
    assert result.headers == (REALM_HEADER,)
    assert REALM_HEADER == ("Proxy-Authenticate", 'Basic realm="bt-gateway"')


CLIENT = "10.0.0.1"


async def test_proxy_auth_accepts_the_right_password(alice_hash: ScryptHash) -> None:
    auth = ProxyAuth({"alice": alice_hash})
    assert await auth.check(basic("alice", PASSWORD), CLIENT) == "alice"
    encoded = _b64(f"alice:{PASSWORD}".encode())
    assert await auth.check("basic " + encoded, CLIENT) == "alice"  # the scheme is case-insensitive
    assert await auth.check("  Basic   " + encoded + " ", CLIENT) == "alice"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        basic("alice", "wrong"),
        basic("alice", PASSWORD + "x"),
        basic("alice", ""),
        basic("bob", PASSWORD),  # unknown user
        basic("", PASSWORD),
        "Basic " + _b64(b"alice"),  # no colon
        "Bearer " + _b64(f"alice:{PASSWORD}".encode()),  # wrong scheme
        "Digest username=alice",
        _b64(f"alice:{PASSWORD}".encode()),  # no scheme
        "Basic",
        "Basic !!!not-base64!!!",
        "Basic " + _b64(f"alice:{PASSWORD}".encode())[:-2],  # bad padding
        "Basic " + _b64(b"\xff\xfe:\xff"),  # not UTF-8
        "Basic \udcff",  # lone surrogate from a latin-1 header
    ],
)
async def test_proxy_auth_refuses(alice_hash: ScryptHash, header: str | None) -> None:
    assert_challenge(await ProxyAuth({"alice": alice_hash}).check(header, CLIENT))


def count_verify(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap ScryptHash.verify (the expensive part) and count its calls in the returned one-item list."""
    calls = [0]
    real = ScryptHash.verify

    def verify(stored: ScryptHash, password: str) -> bool:
        calls[0] += 1
        return real(stored, password)

    monkeypatch.setattr(ScryptHash, "verify", verify)
    return calls


async def test_proxy_auth_caches_only_successes(
    alice_hash: ScryptHash, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_verify(monkeypatch)
    auth = ProxyAuth({"alice": alice_hash})
    good = basic("alice", PASSWORD)
    assert await auth.check(good, CLIENT) == "alice"
    assert calls[0] == 1
    for _ in range(5):
        assert await auth.check(good, CLIENT) == "alice"  # cache hit: no scrypt
    assert calls[0] == 1
    for _ in range(3):
        assert_challenge(await auth.check(basic("alice", "wrong"), CLIENT))  # failures are never remembered
    assert calls[0] == 4


async def test_proxy_auth_cache_is_bounded(alice_hash: ScryptHash, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxyauth, "_CACHE_SIZE", 2)
    calls = count_verify(monkeypatch)
    auth = ProxyAuth({"alice": alice_hash})
    encoded = _b64(f"alice:{PASSWORD}".encode())
    first, second, third = f"Basic {encoded}", f"basic {encoded}", f"BASIC {encoded}"  # three cache keys
    for header in (first, second, third):
        assert await auth.check(header, CLIENT) == "alice"
    assert calls[0] == 3
    assert await auth.check(third, CLIENT) == "alice" and await auth.check(second, CLIENT) == "alice"
    assert calls[0] == 3
    assert await auth.check(first, CLIENT) == "alice"  # evicted (least recently used): verified again
    assert calls[0] == 4


async def test_failed_attempts_per_address_are_limited_before_any_scrypt(
    alice_hash: ScryptHash, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_verify(monkeypatch)
    clock = [1000.0]
    auth = ProxyAuth({"alice": alice_hash}, max_failures_per_minute=3, clock=lambda: clock[0])
    for _ in range(3):
        assert_challenge(await auth.check(basic("alice", "guess"), CLIENT))
        clock[0] += 10
    refused = await auth.check(basic("alice", "guess"), CLIENT)  # t=30: the first failure ages out at 60
    assert isinstance(refused, GatewayError) and refused.code is Code.TOO_MANY_AUTH_FAILURES
    assert refused.status == 429 and dict(refused.headers)["Retry-After"] == "30"
    assert calls[0] == 3  # the refused attempt cost no scrypt
    assert_challenge(await auth.check(basic("alice", "guess"), "10.0.0.2"))  # other addresses unaffected
    clock[0] += 30.5  # the first failure left the window
    assert await auth.check(basic("alice", PASSWORD), CLIENT) == "alice"


async def test_successes_do_not_count_as_failures(alice_hash: ScryptHash) -> None:
    auth = ProxyAuth({"alice": alice_hash}, max_failures_per_minute=1)
    encoded = _b64(f"alice:{PASSWORD}".encode())
    for header in (f"Basic {encoded}", f"basic {encoded}", f"BASIC {encoded}"):  # each one verified
        assert await auth.check(header, CLIENT) == "alice"
    assert_challenge(await auth.check(basic("alice", "guess"), CLIENT))


async def test_unknown_users_cost_the_same_scrypt_as_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoy for unknown names takes the configured hash's cost, so timing tells no user names."""
    costly = ScryptHash.parse(hash_password(PASSWORD, log2_n=12, r=4, p=2))
    seen: list[tuple[int, int, int, int]] = []
    real = hashlib.scrypt

    def scrypt(password: bytes, *, salt: bytes, n: int, r: int, p: int, dklen: int, maxmem: int) -> bytes:
        seen.append((n, r, p, dklen))
        return real(password, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=maxmem)

    monkeypatch.setattr(proxyauth.hashlib, "scrypt", scrypt)
    auth = ProxyAuth({"alice": costly})
    assert_challenge(await auth.check(basic("alice", "wrong"), CLIENT))
    assert_challenge(await auth.check(basic("mallory", "wrong"), CLIENT))
    assert seen == [(4096, 4, 2, 32), (4096, 4, 2, 32)]


# --- the tunnel limiter (the rate limiter, keyed by client address) ----------------------------------


async def test_tunnel_limiter_admits_max_then_refuses_with_retry_after() -> None:
    config = GatewayConfig.model_validate({"forward_proxy": {"rate_limit": {"max_tunnels": 2}}})
    limiter = RateLimiter(tunnel_limit_settings(config))
    assert (await limiter.check(TUNNEL_ROUTE, "ip:10.0.0.1")).allowed
    assert (await limiter.check(TUNNEL_ROUTE, "ip:10.0.0.1")).allowed
    refused = (await limiter.check(TUNNEL_ROUTE, "ip:10.0.0.1")).error
    assert isinstance(refused, GatewayError)
    assert refused.code is Code.RATE_LIMITED and refused.status == 429
    (name, value), *_ = refused.headers
    assert name == "Retry-After" and 1 <= int(value) <= 60
    assert (await limiter.check(TUNNEL_ROUTE, "ip:10.0.0.2")).allowed  # per client address
    assert not (await limiter.check(TUNNEL_ROUTE, "ip:10.0.0.1")).allowed


async def test_tunnel_limiter_zero_disables() -> None:
    config = GatewayConfig.model_validate({"forward_proxy": {"rate_limit": {"max_tunnels": 0}}})
    limiter = RateLimiter(tunnel_limit_settings(config))
    for _ in range(500):
        assert (await limiter.check(TUNNEL_ROUTE, "ip:10.0.0.1")).outcome == "off"
