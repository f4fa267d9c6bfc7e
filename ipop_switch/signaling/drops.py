"""Counting dropped messages by reason, with one log line per drop (rate-limited under a flood)."""

from __future__ import annotations

import logging
import time
from collections import Counter

log = logging.getLogger("ipop_switch.signaling.drop")


class DropCounter:
    """Counts per reason; logs one line per drop, at most ``burst`` per reason per ``period``
    seconds, then one summary line of how many were not logged."""

    def __init__(self, *, burst: int = 20, period: float = 10.0) -> None:
        self.counts: Counter[str] = Counter()
        self.burst, self.period = burst, period
        self._window: dict[str, tuple[float, int]] = {}

    def add(self, reason: str, detail: str = "", source: str = "") -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        start, n = self._window.get(reason, (now, 0))
        if now - start > self.period:
            if n > self.burst:
                log.warning("dropped %d more messages (%s) without logging them", n - self.burst, reason)
            start, n = now, 0
        n += 1
        self._window[reason] = (start, n)
        if n <= self.burst:
            log.warning("dropped message: %s%s%s", reason, f" ({detail})" if detail else "",
                        f" from {source}" if source else "")

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
