"""Whether a configured listener host is loopback: the one test behind every "who can reach this" rule.

Kept apart from the listeners (which import aiohttp) so config-level checks and policies can ask it too.
"""

from __future__ import annotations

import ipaddress

WILDCARDS = frozenset({"", "0.0.0.0", "::"})  # listener hosts that mean every address of this host


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`; a wildcard (0.0.0.0, ::) or any other name is not."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
