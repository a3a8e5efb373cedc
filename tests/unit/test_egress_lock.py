"""The egress lock's rule text as a pure function: exact rules, the IPv4/IPv6 split, the jump bookkeeping,
and `--allow` values refused with the reason."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.egress_apply import dry_run
from gateway.egress_lock import Allow, LockSpec, count_jumps, parse_allow, restore_input, summary

SPEC = LockSpec(
    gateway_uid=10001,
    allows=(
        parse_allow("10.0.0.0/8"),
        parse_allow("10.96.0.10:53"),
        parse_allow("[fd00:10:96::a]:53"),
        parse_allow("fd00::/8"),
    ),
)

IPV4 = """\
*filter
:BT-GATEWAY-EGRESS - [0:0]
-F BT-GATEWAY-EGRESS
-A BT-GATEWAY-EGRESS -o lo -j RETURN
-A BT-GATEWAY-EGRESS -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A BT-GATEWAY-EGRESS -m owner --uid-owner 10001 -j RETURN
-A BT-GATEWAY-EGRESS -d 10.0.0.0/8 -j RETURN
-A BT-GATEWAY-EGRESS -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -j RETURN
-A BT-GATEWAY-EGRESS -d 10.96.0.10/32 -p udp -m udp --dport 53 -j RETURN
-A BT-GATEWAY-EGRESS -p tcp -j REJECT --reject-with tcp-reset
-A BT-GATEWAY-EGRESS -j REJECT --reject-with icmp-port-unreachable
-I OUTPUT 1 -j BT-GATEWAY-EGRESS
COMMIT
"""

IPV6 = """\
*filter
:BT-GATEWAY-EGRESS - [0:0]
-F BT-GATEWAY-EGRESS
-A BT-GATEWAY-EGRESS -o lo -j RETURN
-A BT-GATEWAY-EGRESS -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A BT-GATEWAY-EGRESS -m owner --uid-owner 10001 -j RETURN
-A BT-GATEWAY-EGRESS -p ipv6-icmp -m icmp6 --icmpv6-type router-solicitation -j RETURN
-A BT-GATEWAY-EGRESS -p ipv6-icmp -m icmp6 --icmpv6-type neighbour-solicitation -j RETURN
-A BT-GATEWAY-EGRESS -p ipv6-icmp -m icmp6 --icmpv6-type neighbour-advertisement -j RETURN
-A BT-GATEWAY-EGRESS -p ipv6-icmp -m icmp6 --icmpv6-type 143 -j RETURN
-A BT-GATEWAY-EGRESS -d fd00:10:96::a/128 -p tcp -m tcp --dport 53 -j RETURN
-A BT-GATEWAY-EGRESS -d fd00:10:96::a/128 -p udp -m udp --dport 53 -j RETURN
-A BT-GATEWAY-EGRESS -d fd00::/8 -j RETURN
-A BT-GATEWAY-EGRESS -p tcp -j REJECT --reject-with tcp-reset
-A BT-GATEWAY-EGRESS -j REJECT --reject-with icmp6-port-unreachable
-I OUTPUT 1 -j BT-GATEWAY-EGRESS
COMMIT
"""


def test_each_family_gets_its_own_destinations_and_its_own_reject() -> None:
    assert restore_input(SPEC, 4, jumps=0) == IPV4
    assert restore_input(SPEC, 6, jumps=0) == IPV6


def test_dry_run_prints_both_transactions_as_they_would_be_fed() -> None:
    assert dry_run(SPEC) == f"# iptables-restore --noflush\n{IPV4}# ip6tables-restore --noflush\n{IPV6}"


def test_a_second_run_rebuilds_the_chain_and_leaves_one_jump_first() -> None:
    """The chain is flushed either way; every jump there is deleted and one is inserted first in OUTPUT,
    so a rule put ahead of the lock since the last run does not stay ahead."""
    jump = "-I OUTPUT 1 -j BT-GATEWAY-EGRESS\n"
    once = restore_input(SPEC, 4, jumps=1)
    assert once == IPV4.replace(jump, "-D OUTPUT -j BT-GATEWAY-EGRESS\n" + jump)
    thrice = restore_input(SPEC, 4, jumps=3)
    assert thrice == IPV4.replace(jump, "-D OUTPUT -j BT-GATEWAY-EGRESS\n" * 3 + jump)


def test_only_the_gateway_uid_is_exempt_and_nothing_else_without_allows() -> None:
    text = restore_input(LockSpec(gateway_uid=4242), 4, jumps=1)
    assert [line for line in text.splitlines() if "RETURN" in line] == [
        "-A BT-GATEWAY-EGRESS -o lo -j RETURN",
        "-A BT-GATEWAY-EGRESS -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        "-A BT-GATEWAY-EGRESS -m owner --uid-owner 4242 -j RETURN",
    ]


def test_jumps_are_counted_from_iptables_save_output() -> None:
    saved = (
        "*filter\n:OUTPUT ACCEPT [0:0]\n:BT-GATEWAY-EGRESS - [0:0]\n-A OUTPUT -j BT-GATEWAY-EGRESS\n"
        "-A OUTPUT -d 10.0.0.1/32 -j BT-GATEWAY-EGRESS\n-A OUTPUT -j BT-GATEWAY-EGRESS\nCOMMIT\n"
    )
    assert count_jumps(saved) == 2  # only the unconditional jump the lock owns
    assert count_jumps("*filter\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n") == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8", Allow(ipaddress.ip_network("10.0.0.0/8"))),
        ("10.96.0.10", Allow(ipaddress.ip_network("10.96.0.10/32"))),
        ("10.96.0.10:53", Allow(ipaddress.ip_network("10.96.0.10/32"), 53)),
        ("10.96.0.0/12:443", Allow(ipaddress.ip_network("10.96.0.0/12"), 443)),
        ("fd00::/8", Allow(ipaddress.ip_network("fd00::/8"))),
        ("2001:db8::a", Allow(ipaddress.ip_network("2001:db8::a/128"))),
        ("[2001:db8::a]:5432", Allow(ipaddress.ip_network("2001:db8::a/128"), 5432)),
        ("[fd00::/8]:53", Allow(ipaddress.ip_network("fd00::/8"), 53)),
    ],
)
def test_allow_values(text: str, expected: Allow) -> None:
    assert parse_allow(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.1/8", "'10.0.0.1/8': host bits are set after the prefix; the network is 10.0.0.0/8"),
        ("10.0.0.0/33", "'10.0.0.0/33': prefix length must be a number from 0 to 32"),
        (
            "example.com",
            "'example.com': 'example.com' is not an IP address (names are not resolved: give addresses)",
        ),
        ("10.0.0.0/8:0", "'10.0.0.0/8:0': port must be a number from 1 to 65535"),
        ("10.0.0.0/8:65536", "'10.0.0.0/8:65536': port must be a number from 1 to 65535"),
        ("10.0.0.0/8:dns", "'10.0.0.0/8:dns': port must be a number from 1 to 65535"),
        ("fd00::/8:53", "'fd00::/8:53': put an IPv6 network in brackets to give a port, as in [fd00::/8]:53"),
        ("[fd00::/8]", "'[fd00::/8]': a bracketed IPv6 network takes a port, as in [fd00::/8]:53"),
        ("[10.0.0.1]:53", "'[10.0.0.1]:53': brackets are for IPv6 only; write an IPv4 port as 10.0.0.0/8:53"),
        ("[fd00::/129]:53", "'[fd00::/129]:53': prefix length must be a number from 0 to 128"),
        ("fe80::1%eth0", "'fe80::1%eth0': a zone id names a local interface, not a destination"),
        ("0.0.0.0/0", "'0.0.0.0/0': that is every address: the lock would let every UID out"),
        ("[::/0]:443", "'[::/0]:443': that is every address: the lock would let every UID out"),
    ],
)
def test_bad_allow_values_are_refused_saying_why(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_allow(text)
    assert str(caught.value) == message


def test_the_summary_is_one_line_naming_the_uid_and_every_destination() -> None:
    line = summary(SPEC, {4: 8, 6: 13})
    assert line == (
        "egress-lock: chain BT-GATEWAY-EGRESS installed (IPv4 8 rules, IPv6 13 rules): only uid 10001 leaves "
        "the pod; also open: loopback, established connections, allowed destinations: 10.0.0.0/8, "
        "10.96.0.10/32:53, [fd00:10:96::a/128]:53, fd00::/8"
    )
