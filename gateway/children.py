"""Child processes that do not outlive their parent."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal


def die_with_parent() -> None:
    """``preexec_fn`` for subprocess: the child gets SIGTERM when its parent dies (Linux's
    PR_SET_PDEATHSIG), so a killed supervisor or demo leaves no orphan behind."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
