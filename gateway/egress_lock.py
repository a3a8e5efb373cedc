"""`egress-lock`: the rules that keep every process of a pod but the gateway off the network.

In the sidecar pattern a NetworkPolicy selects the pod, so whatever it lets the gateway reach the app can
reach too. The lock works where a mesh's init container does: in the pod's own network namespace, an
OUTPUT filter that lets a packet out only when it goes to loopback, answers a connection the pod accepted
(or one the gateway opened), comes from a socket of the gateway's UID, or goes to a destination the
operator allows; anything else is rejected (TCP reset, ICMP port unreachable), so a client fails at once
instead of timing out.

This module only builds text: the `iptables-restore`/`ip6tables-restore` input, one transaction per
family, so it is tested without root. gateway/egress_apply.py runs it.

`--allow` grammar (one destination each; IPv4 and IPv6):
    allow = ipv4net [ ":" port ]            ; 10.0.0.0/8, 10.96.0.10:53, 10.96.0.10/32:53
          | ipv6net                         ; fd00::/8, 2001:db8::10
          | "[" ipv6net "]" ":" port        ; [fd00::/8]:5432, [2001:db8::a]:53
    net   = address [ "/" prefix-length ]   ; no host bits set; a bare address is one host
A port opens TCP and UDP to it (DNS needs both); no port opens every protocol and port.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from gateway.policy.allowlist import parse_port

CHAIN = "BT-GATEWAY-EGRESS"
JUMP = f"-A OUTPUT -j {CHAIN}"  # as iptables-save prints the one jump the lock owns
Family = Literal[4, 6]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Neighbour discovery and MLD come from the kernel, not from a socket, so no UID owns them; without them
# IPv6 stops working for the gateway too. Router and neighbour solicitation/advertisement, MLDv2 report.
_ICMPV6_KERNEL = ("router-solicitation", "neighbour-solicitation", "neighbour-advertisement", "143")
_PORT_UNREACHABLE = {4: "icmp-port-unreachable", 6: "icmp6-port-unreachable"}


@dataclass(frozen=True, slots=True)
class Allow:
    """A destination the app may reach directly; `port` None means every protocol and port."""

    network: Network
    port: int | None = None

    def rules(self) -> list[str]:
        """The RETURN rules (without `-A CHAIN`) that let packets to this destination pass the chain."""
        if self.port is None:
            return [f"-d {self.network} -j RETURN"]
        return [
            f"-d {self.network} -p {proto} -m {proto} --dport {self.port} -j RETURN"
            for proto in ("tcp", "udp")
        ]


@dataclass(frozen=True, slots=True)
class LockSpec:
    """What the lock lets out: the gateway's UID and the operator's destinations."""

    gateway_uid: int
    allows: tuple[Allow, ...] = ()


def parse_allow(text: str) -> Allow:
    """Parse one `--allow` value (see the module grammar); raise ValueError saying what is wrong."""
    raw = text.strip()
    port: int | None = None
    net = raw
    if raw.startswith("["):
        net, sep, rest = raw[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r}: a bracketed IPv6 network takes a port, as in [fd00::/8]:53")
        port = parse_port(rest[1:], text)
        if ":" not in net:
            raise ValueError(f"{text!r}: brackets are for IPv6 only; write an IPv4 port as 10.0.0.0/8:53")
    elif raw.count(":") == 1:  # IPv4 with a port; an IPv6 network has at least two colons
        net, port_text = raw.split(":")
        port = parse_port(port_text, text)
    elif "/" in raw and ":" in raw.split("/", 1)[1]:
        raise ValueError(f"{text!r}: put an IPv6 network in brackets to give a port, as in [fd00::/8]:53")
    if "%" in net:
        raise ValueError(f"{text!r}: a zone id names a local interface, not a destination")
    network = _parse_network(net, text)
    return Allow(network=network, port=port)


def _parse_network(net: str, allow: str) -> Network:
    address, slash, length = net.partition("/")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(
            f"{allow!r}: {address!r} is not an IP address (names are not resolved: give addresses)"
        ) from None
    if slash and not (length.isascii() and length.isdigit() and int(length) <= ip.max_prefixlen):
        raise ValueError(f"{allow!r}: prefix length must be a number from 0 to {ip.max_prefixlen}")
    try:
        network = ipaddress.ip_network(net, strict=True)
    except ValueError:
        loose = ipaddress.ip_network(net, strict=False)
        raise ValueError(f"{allow!r}: host bits are set after the prefix; the network is {loose}") from None
    if network.prefixlen == 0:
        raise ValueError(f"{allow!r}: that is every address: the lock would let every UID out")
    return network


def chain_rules(spec: LockSpec, family: Family) -> list[str]:
    """The chain's rules for one family, in order, each as an `-A` line of iptables-restore input.

    RETURN, not ACCEPT: what passes the lock still meets the rest of OUTPUT, so the lock never opens
    what another rule in the pod closes.
    """
    passes = [
        "-o lo -j RETURN",
        "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        f"-m owner --uid-owner {spec.gateway_uid} -j RETURN",
    ]
    if family == 6:
        passes += [f"-p ipv6-icmp -m icmp6 --icmpv6-type {kind} -j RETURN" for kind in _ICMPV6_KERNEL]
    for allow in spec.allows:
        if allow.network.version == family:
            passes += allow.rules()
    rejects = [
        "-p tcp -j REJECT --reject-with tcp-reset",
        f"-j REJECT --reject-with {_PORT_UNREACHABLE[family]}",
    ]
    return [f"-A {CHAIN} {rule}" for rule in [*passes, *rejects]]


def restore_input(spec: LockSpec, family: Family, jumps: int) -> str:
    """The whole `iptables-restore --noflush` input: one atomic transaction on the filter table.

    The chain is declared (created if missing) and flushed, then rebuilt, so a second run replaces the
    first. `jumps` is how many `-A OUTPUT -j CHAIN` rules exist now (`count_jumps`): each is deleted and
    one is inserted first in OUTPUT, so a rule put ahead of it since the last run does not stay ahead.
    """
    lines = ["*filter", f":{CHAIN} - [0:0]", f"-F {CHAIN}", *chain_rules(spec, family)]
    lines += [f"-D OUTPUT -j {CHAIN}"] * jumps
    lines.append(f"-I OUTPUT 1 -j {CHAIN}")
    return "\n".join([*lines, "COMMIT", ""])


def count_jumps(saved: str) -> int:
    """How many jumps to the chain OUTPUT holds, from `iptables-save -t filter` output."""
    return sum(1 for line in saved.splitlines() if line.strip() == JUMP)


def summary(spec: LockSpec, counts: dict[Family, int]) -> str:
    """The one line `egress-lock` prints once the rules are in."""
    destinations = ", ".join(_shown(a) for a in spec.allows) or "none"
    return (
        f"egress-lock: chain {CHAIN} installed (IPv4 {counts[4]} rules, IPv6 {counts[6]} rules): "
        f"only uid {spec.gateway_uid} leaves the pod; also open: loopback, established connections, "
        f"allowed destinations: {destinations}"
    )


def _shown(allow: Allow) -> str:
    if allow.port is None:
        return str(allow.network)
    return (
        f"[{allow.network}]:{allow.port}" if allow.network.version == 6 else f"{allow.network}:{allow.port}"
    )
