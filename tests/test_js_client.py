"""The mini-program JavaScript client (clients/miniprogram/), by Node's built-in test runner.

Its tests start the real gateway in demo mode (with this interpreter, via WXGW_PYTHON) and drive
it through a fake `wx` global. Node is required: a machine without it fails here, it does not
skip, so a missing Node on CI cannot pass unnoticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_DIR = ROOT / "clients" / "miniprogram" / "test"


def test_miniprogram_client_node_tests_pass() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("`node` is not on PATH: the mini-program client's tests "
                    "(clients/miniprogram/test/) need Node.js >= 20: run `bash scripts/system-packages.sh`",
                    pytrace=False)
    # The files, not the directory: Node 20 searches a directory argument, Node >= 21 does not
    # (it takes globs and would try to load the directory as a module).
    files = sorted(str(p.relative_to(ROOT)) for p in TEST_DIR.glob("*.test.js"))
    assert files, f"no *.test.js under {TEST_DIR}"
    env = {**os.environ, "WXGW_PYTHON": sys.executable}
    env.pop("NODE_OPTIONS", None)
    try:
        result = subprocess.run([node, "--test", *files], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        pytest.fail(f"node --test did not finish within 120 s:\n{out or ''}", pytrace=False)
    if result.returncode != 0:
        version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
        pytest.fail(f"`node --test {' '.join(files)}` (node {version}) exited with "
                    f"{result.returncode}:\n{result.stdout}\n{result.stderr}", pytrace=False)
