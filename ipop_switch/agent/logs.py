"""The agent's log lines: one line per event (``event=... key=value``), journald-friendly.

A record with a traceback stays one line (newlines escaped as ``\\n``), so ``journalctl``
and log shippers never split an event. Under systemd (``$JOURNAL_STREAM`` names our
stderr) the timestamp is left to journald and each line starts with its syslog priority
(``<3>`` error ... ``<7>`` debug), which journald reads as the entry's priority.
"""

from __future__ import annotations

import logging
import os
import sys

PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def under_journald(stream=None) -> bool:
    """True when ``stream`` (stderr) is the journal stream systemd gave us."""
    val = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = val.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class OneLineFormatter(logging.Formatter):
    def __init__(self, fmt: str, *, priority: bool = False) -> None:
        super().__init__(fmt)
        self.priority = priority

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record).replace("\r", "").replace("\n", "\\n")
        if self.priority:
            line = f"<{PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def setup_logging(level: str, stream=None) -> None:
    """The root logger: one handler on stderr, one line per record."""
    stream = stream or sys.stderr
    journald = under_journald(stream)
    fmt = "%(levelname)s %(name)s %(message)s" if journald else "%(asctime)s %(levelname)s %(name)s %(message)s"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter(fmt, priority=journald))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
