"""What a test needs from the machine: missing, it is skipped on a developer machine and fails under CI=true,
where a skip would hide a broken feature."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def unavailable(message: str) -> NoReturn:
    """Skip here, fail in CI (`.ci/run` installs everything a test needs)."""
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (required under CI=true)")
    pytest.skip(message)


def require_binaries(*names: str) -> dict[str, str]:
    """The path of each binary, or skip/fail naming every one that is missing."""
    found = {name: shutil.which(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        unavailable(f"not installed: {', '.join(missing)}")
    return {name: path for name, path in found.items() if path is not None}
