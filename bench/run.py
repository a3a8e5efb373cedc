"""`make bench`: every benchmark in this folder, one after the other, each printing its own table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = ("proxy_bench.py", "ratelimit_bench.py")


def main() -> int:
    here = Path(__file__).parent
    failed = 0
    for name in BENCHES:
        path = here / name
        if not path.exists():
            continue
        print(f"== {name}", flush=True)
        failed |= subprocess.run([sys.executable, str(path)], check=False).returncode
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
