"""Install the egress lock (gateway/egress_lock.py) with `iptables-restore` and `ip6tables-restore`.

Each family is one `--noflush` transaction: the kernel swaps the chain in whole or not at all, and the
rest of the pod's rules stay as they are. IPv4 goes first; if IPv6 then fails, the command fails and the
init container with it, so the pod never starts half locked. Failures become one `LockError` line.
"""

from __future__ import annotations

import subprocess

from gateway.egress_lock import Family, LockSpec, chain_rules, count_jumps, restore_input

TOOLS: dict[Family, tuple[str, str]] = {
    4: ("iptables-save", "iptables-restore"),
    6: ("ip6tables-save", "ip6tables-restore"),
}
TIMEOUT_S = 30  # a restore that hangs (a wedged netlink, a held legacy lock) fails the init container


class LockError(Exception):
    """The lock could not be installed: the tool is missing, not permitted, or refused the rules."""


def install(spec: LockSpec) -> dict[Family, int]:
    """Install (or replace) the chain and its one jump for both families; the rule count of each."""
    counts: dict[Family, int] = {}
    for family, (save, restore) in TOOLS.items():
        jumps = count_jumps(_run([save, "-t", "filter"]))
        _run([restore, "--noflush"], restore_input(spec, family, jumps))
        counts[family] = len(chain_rules(spec, family))
    return counts


def dry_run(spec: LockSpec) -> str:
    """What `install` would feed each tool on a pod without the lock yet, with the command as a comment."""
    return "".join(
        f"# {restore} --noflush\n{restore_input(spec, family, 0)}" for family, (_, restore) in TOOLS.items()
    )


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise LockError(
            f"{argv[0]} not found: install the iptables package (Debian: apt-get install iptables)"
        ) from None
    except PermissionError as exc:
        raise LockError(f"{argv[0]}: {exc.strerror}") from None
    except subprocess.TimeoutExpired:
        raise LockError(f"{argv[0]} did not finish within {TIMEOUT_S} s") from None
    if done.returncode != 0:
        said = [line for line in done.stderr.splitlines() if line.strip()]
        detail = said[0] if said else "no message"
        hint = (
            " (needs root with CAP_NET_ADMIN in the pod's network namespace)" if _denied(done.stderr) else ""
        )
        raise LockError(f"{argv[0]} failed with exit code {done.returncode}: {detail}{hint}")
    return done.stdout


def _denied(stderr: str) -> bool:
    text = stderr.lower()
    return "permission denied" in text or "operation not permitted" in text
