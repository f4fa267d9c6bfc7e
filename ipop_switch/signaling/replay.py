"""Replay protection: a timestamp window plus a bounded cache of seen (sender, nonce) pairs.

A message is fresh if its timestamp is within ``window`` seconds of our clock and its
nonce was not seen. Nonces need keeping only while their timestamp is inside the window.
The cache is bounded: when full, the oldest entries are evicted and the oldest evicted
timestamp becomes a floor below which everything counts as stale, so a flood can cost
us some valid late messages but never lets a replay through.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class ReplayGuard:
    def __init__(self, window: float = 60.0, max_entries: int = 50_000) -> None:
        self.window_ms = int(window * 1000)
        self.max_entries = max_entries
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()  # insertion order ~ arrival order
        self._floor_ms = 0

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, sender: str, nonce: str, ts_ms: int, now_ms: int | None = None) -> str | None:
        """The drop reason ("stale" or "replayed"), or None if fresh. Does not record."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if abs(now_ms - ts_ms) > self.window_ms or ts_ms <= self._floor_ms:
            return "stale"
        if (sender, nonce) in self._seen:
            return "replayed"
        return None

    def commit(self, sender: str, nonce: str, ts_ms: int, now_ms: int | None = None) -> None:
        """Record a message that passed every check (only verified messages may fill the cache)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        self._expire(now_ms)
        self._seen[(sender, nonce)] = ts_ms
        while len(self._seen) > self.max_entries:
            _, old_ts = self._seen.popitem(last=False)
            self._floor_ms = max(self._floor_ms, old_ts)

    def _expire(self, now_ms: int) -> None:
        # entries leave roughly in arrival order; stop at the first one still inside the window
        limit = now_ms - self.window_ms
        while self._seen:
            key, ts = next(iter(self._seen.items()))
            if ts >= limit:
                break
            self._seen.popitem(last=False)
