"""`python -m gateway`, and the `bt-gateway` console script: SIGHUP is held before anything slow loads."""

import sys

from gateway.hangup import hold


def run() -> int:
    """The command line (gateway/cli.py), once a SIGHUP can no longer kill the process."""
    hold()
    from gateway.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
