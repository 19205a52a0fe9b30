"""System packages the tests need, installed from Debian packages when missing (CI runs as
root); a test that cannot get one is skipped with the reason, never passed."""

from __future__ import annotations

import os
import subprocess
from typing import Callable

import pytest


def debian_package(package: str, find: Callable[[], str | None]) -> str:
    """What ``find`` finds, after ``apt-get install package`` when it finds nothing."""
    found = find()
    if found is not None:
        return found
    if os.geteuid() != 0:
        pytest.skip(f"{package} is not installed and this test is not root, so it cannot "
                    f"`apt-get install {package}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"],
                 ["apt-get", "install", "-y", "--no-install-recommends", package]):
        try:
            result = subprocess.run(argv, env=env, capture_output=True, text=True,
                                    timeout=360, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"`{' '.join(argv)}` failed, so {package} cannot be installed: {exc}")
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            pytest.skip(f"`{' '.join(argv)}` failed, so {package} cannot be installed: "
                        + " | ".join(tail))
    found = find()
    assert found, f"apt-get installed {package}, but it is not where expected"
    return found
