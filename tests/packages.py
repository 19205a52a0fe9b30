"""System packages the tests need. scripts/system-packages.sh installs them, once, before the
test run (the README's test command and CI run it first); a test that does not find one fails
here naming that script, never skips, and installs nothing itself."""

from __future__ import annotations

from typing import Callable

import pytest

SCRIPT = "scripts/system-packages.sh"


def debian_package(package: str, find: Callable[[], str | None]) -> str:
    """What ``find`` finds; the test fails, naming the script that installs ``package``,
    when it finds nothing."""
    found = find()
    if found is None:
        pytest.fail(f"{package} is not installed: run `bash {SCRIPT}` (as root, or with sudo) "
                    f"before the tests; it installs {package} and the suite's other system "
                    "packages", pytrace=False)
    return found
