"""The suite's system packages come from one visible script, run before the tests by the
README's test command and by CI; a test missing one fails naming it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from packages import SCRIPT, debian_package

ROOT = Path(__file__).resolve().parent.parent


def test_readme_and_ci_run_the_same_command_and_it_installs_the_packages_first() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (readme_command,) = [line for line in readme.splitlines() if "-m pytest" in line
                         and line.startswith("bash ")]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    (ci_command,) = [line for line in ci.splitlines() if "-m pytest" in line]
    assert ci_command == readme_command
    assert readme_command.startswith(f"bash {SCRIPT} && ")


def test_the_script_installs_every_package_a_test_asks_for() -> None:
    script = (ROOT / SCRIPT).read_text(encoding="utf-8")
    asked: set[str] = set()
    for path in (ROOT / "tests").glob("*.py"):
        if path.name == "test_system_packages.py":  # its made-up names
            continue
        asked |= set(re.findall(r'debian_package\(\s*"([^"]+)"', path.read_text("utf-8")))
    # The servlet containers name their package in a table, not in the call.
    asked |= set(re.findall(r'"(lib\w+-java)"',
                            (ROOT / "tests" / "test_paths.py").read_text("utf-8")))
    assert {"curl", "nginx", "openjdk-17-jdk-headless", "libtomcat10-java",
            "libjetty9-java"} <= asked
    installed = set(re.findall(r"missing\+=\(([\w.+-]+)\)", script))
    assert asked | {"nodejs"} <= installed, asked - installed
    assert subprocess.run(["bash", "-n", str(ROOT / SCRIPT)]).returncode == 0
    # No test installs anything itself.
    for path in (ROOT / "tests").glob("*.py"):
        # (test_deploy.py lints Dockerfiles that say "apt-get install")
        if path.name not in ("test_deploy.py", "test_system_packages.py"):
            assert '"apt-get"' not in path.read_text("utf-8"), path.name


def test_a_missing_package_fails_the_test_naming_the_script() -> None:
    with pytest.raises(pytest.fail.Exception) as info:
        debian_package("no-such-package", lambda: None)
    assert f"bash {SCRIPT}" in str(info.value) and "no-such-package" in str(info.value)
    assert debian_package("present", lambda: "/usr/bin/present") == "/usr/bin/present"
