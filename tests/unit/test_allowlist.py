"""The egress allow-list as a pure policy: canonical hosts, label-boundary wildcards, ports, literals."""

from __future__ import annotations

import pytest

from gateway.errors import Code
from gateway.policy.allowlist import AllowEntry, Allowlist, canonical_host, parse_entry

ALLOW = Allowlist.parse(
    ["www.braintrust.dev", "*.braintrust.dev", "api.example.com:8443", "10.0.0.5", "[::1]"]
)


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("www.braintrust.dev", 443),
        ("WWW.BrainTrust.DEV", 443),
        ("www.braintrust.dev.", 443),
        ("api.braintrust.dev", 443),
        ("a.b.braintrust.dev", 80),
        ("api.example.com", 8443),
        ("10.0.0.5", 443),
        ("::1", 443),
        ("[::1]", 443),
        ("\uff57\uff57\uff57.braintrust.dev", 443),  # fullwidth letters: IDNA maps them to www
    ],
)
def test_allowed(host: str, port: int) -> None:
    assert ALLOW.allows(host, port)
    assert ALLOW.check(host, port) is None


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("braintrust.dev", 443),  # the wildcard is strictly below the domain
        ("evilbraintrust.dev", 443),
        ("braintrust.dev.evil.com", 443),
        ("www.braintrust.dev.evil.com", 443),
        ("api.example.com", 443),  # listed with another port
        ("10.0.0.6", 443),
        ("0x0a.0.0.5", 443),
        ("2130706433", 443),
        ("www.braintrust.dev%00", 443),
        ("www.braintrust.dev%2e", 443),
        ("user@www.braintrust.dev", 443),
        ("www.braintrust.dev..", 443),
        ("www braintrust.dev", 443),
        ("", 443),
        (None, 443),
        ("-x.braintrust.dev", 443),
        ("::1%eth0", 443),  # an IPv6 zone id names a local interface
        ("[fe80::1%25eth0]", 443),
    ],
)
def test_denied(host: str | None, port: int) -> None:
    assert not ALLOW.allows(host, port)
    error = ALLOW.check(host, port)
    assert error is not None and error.code is Code.EGRESS_DENIED and error.status == 403


def test_idna_names_match_in_punycode() -> None:
    allow = Allowlist.parse(["bücher.example"])
    assert allow.allows("xn--bcher-kva.example", 443)
    assert allow.allows("BÜCHER.example", 443)
    assert canonical_host("Bücher.Example.") == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "*braintrust.dev",
            "'*braintrust.dev': a wildcard must be a whole leading label, as in *.example.com",
        ),
        ("a.*.dev", "'a.*.dev': a wildcard must be a whole leading label, as in *.example.com"),
        ("*.10.0.0.5", "'*.10.0.0.5': a wildcard cannot cover an IP address"),
        ("*.dev", "'*.dev': a wildcard must sit above a domain with at least two labels"),
        ("host:0", "'host:0': port must be a number from 1 to 65535"),
        ("host:99999", "'host:99999': port must be a number from 1 to 65535"),
        ("host:\u0664\u0664\u0663", "'host:\u0664\u0664\u0663': port must be a number from 1 to 65535"),
        ("bad host", "'bad host' is not a valid host name or IP address"),
        ("a@b.com", "'a@b.com' is not a valid host name or IP address"),
        ("[fe80::1%eth0]", "'[fe80::1%eth0]' is not a valid host name or IP address"),
    ],
)
def test_bad_entries_are_rejected_with_exact_messages(entry: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_entry(entry)
    assert str(info.value) == message


def test_a_wildcard_never_covers_an_ip_literal() -> None:
    """IP literals match only when listed literally, whatever a wildcard's suffix looks like."""
    wild = Allowlist((AllowEntry(host="0.0.1", wildcard=True, port=None),))
    assert not wild.allows("127.0.0.1", 80)
    with pytest.raises(ValueError, match="a wildcard cannot cover an IP address"):
        parse_entry("*.0.0.1")


def test_ipv6_entry_with_port() -> None:
    allow = Allowlist.parse(["[2001:db8::1]:443"])
    assert allow.allows("2001:db8:0::1", 443)
    assert not allow.allows("2001:db8::1", 80)
