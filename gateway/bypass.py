"""Ways around the gateway that it can see but not close, said out loud: once per host, counted each time.

- `data_plane_not_routed`: a login response sends the SDK to a data plane no advertised route serves, so
  every `/v1` and `/logs3` call after it goes straight there.
- `relay_host_not_allowed`: a signed upload or download URL whose host is not in `relay.allow_hosts`, so
  the SDK transfers the object directly (whether or not a relay is configured).
- `use_reverse_mode`: a tunnel refused because a rate-limited route serves its host (the SDK must be
  pointed at the gateway with BRAINTRUST_APP_URL instead).

Steps and rewriters only note a `Bypass` on the request's `Exchange`; the handler logs and counts it when
the request ends. Hosts come from upstream responses, so the set of hosts already reported is bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from gateway.logs import get_logger

DATA_PLANE_NOT_ROUTED: Final = "data_plane_not_routed"
RELAY_HOST_NOT_ALLOWED: Final = "relay_host_not_allowed"
USE_REVERSE_MODE: Final = "use_reverse_mode"
MAX_REPORTED = 1024  # (event, host) pairs remembered; past it the warnings stop, the counts go on
log = get_logger("gateway.bypass")


@dataclass(frozen=True, slots=True)
class Bypass:
    """One way around the gateway: which (`event`), to where (`host`), and what to configure (`detail`)."""

    event: str
    host: str
    detail: str


class BypassLog:
    """Warns once per (event, host) for the life of the process, whatever reloads happen."""

    def __init__(self) -> None:
        self._reported: set[tuple[str, str]] = set()

    def report(self, bypass: Bypass, request_id: str) -> None:
        key = (bypass.event, bypass.host)
        if key in self._reported or len(self._reported) >= MAX_REPORTED:
            return
        self._reported.add(key)
        log.warning(bypass.event, host=bypass.host, detail=bypass.detail, request_id=request_id)
