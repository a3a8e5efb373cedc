"""The open-file limit the connection bounds need: raised at start, said when the system caps it lower.

Every client connection is a descriptor, and so is every upstream connection (pooled, or a tunnel's). A
process started under a 1,024 soft limit (systemd's default, and many container runtimes') would fail
`accept()` with EMFILE long before `limits.max_client_connections` answers 503; like nginx's
`worker_rlimit_nofile`, the gateway raises its soft limit toward the hard one itself.
"""

from __future__ import annotations

import resource

from gateway.config.model import Limits

SPARE = 256  # listeners, the admin port, log and audit files, Redis, DNS, certificate reloads


def needed(limits: Limits) -> int:
    """Each client connection with an upstream one of its own at most (a request's or a tunnel's), the
    idle pool, and the spare."""
    return 2 * limits.max_client_connections + limits.max_connections + SPARE


def raise_soft_limit(want: int) -> int:
    """The soft RLIMIT_NOFILE raised to `want` where the hard limit allows (never lowered); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:  # (-1 on Linux: no figure to compare)
        return want
    if soft < want:
        soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft
