"""The datapath's optional C loops (``_fastpath.c``): loaded when built, else None.

``pip install`` builds the extension when a C compiler, Python's headers and OpenSSL's
(libssl-dev) are there; ``bootstrap.sh`` installs them. Without it the datapath runs
the same protocol in Python, slower (docs/benchmarks.md). ``IPSW_NO_ACCEL=1`` turns the
C loops off, for comparisons and to test the Python path; ``status`` reports which runs.
"""

from __future__ import annotations

import os
from types import ModuleType

fastpath: ModuleType | None
why_not = ""

try:
    if os.environ.get("IPSW_NO_ACCEL"):
        raise ImportError("turned off by IPSW_NO_ACCEL")
    from . import _fastpath as fastpath
except ImportError as e:          # not built (no compiler or headers at install time)
    fastpath = None
    why_not = str(e)


def name() -> str:
    """What the datapath's per-segment loops run in, for ``status`` and the bench."""
    return "c" if fastpath is not None else f"python ({why_not})"
