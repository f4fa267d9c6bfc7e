"""Replay protection: a timestamp window plus a bounded cache of seen nonces, per sender.

A message is fresh if its timestamp is at most ``window`` seconds old and at most
``max_future`` seconds ahead of our clock, and its nonce was not seen. Nonces need
keeping only while their timestamp is inside the window.

Every sender has its own cache and its own floor. A cache is bounded (per sender and in
total): when full, the sender's oldest entries are evicted and the newest evicted
timestamp becomes that sender's floor, below which its messages count as stale. So a
flood costs the flooding sender some valid late messages of its own but never lets a
replay through, and no sender can make anyone else's messages stale: with one floor for
all, a member dating its messages near the window's future edge made every other
member's messages "stale" for a minute (security review, finding 6).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class _Sender:
    seen: OrderedDict[str, int] = field(default_factory=OrderedDict)   # nonce -> ts, in arrival order
    floor_ms: int = 0


class ReplayGuard:
    def __init__(self, window: float = 60.0, max_entries: int = 50_000, *, max_future: float = 5.0,
                 per_sender: int | None = None) -> None:
        self.window_ms = int(window * 1000)
        self.future_ms = int(max_future * 1000)
        self.max_entries = max_entries
        self.per_sender = min(per_sender or max_entries, max_entries)
        self._senders: dict[str, _Sender] = {}
        self._total = 0

    def __len__(self) -> int:
        return self._total

    def check(self, sender: str, nonce: str, ts_ms: int, now_ms: int | None = None) -> str | None:
        """The drop reason ("stale" or "replayed"), or None if fresh. Does not record."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if now_ms - ts_ms > self.window_ms or ts_ms - now_ms > self.future_ms:
            return "stale"
        st = self._senders.get(sender)
        if st is None:
            return None
        if ts_ms <= st.floor_ms:
            return "stale"
        if nonce in st.seen:
            return "replayed"
        return None

    def commit(self, sender: str, nonce: str, ts_ms: int, now_ms: int | None = None) -> None:
        """Record a message that passed every check (only verified messages may fill the cache)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        self._expire(now_ms)
        st = self._senders.setdefault(sender, _Sender())
        if nonce not in st.seen:
            self._total += 1
        st.seen[nonce] = ts_ms
        while len(st.seen) > self.per_sender:
            self._evict(st)
        while self._total > self.max_entries:
            # the sender with the most entries pays (a flooder pays for its own flood)
            self._evict(max(self._senders.values(), key=lambda s: len(s.seen)))

    def _evict(self, st: _Sender) -> None:
        _, old_ts = st.seen.popitem(last=False)
        st.floor_ms = max(st.floor_ms, old_ts)
        self._total -= 1

    def _expire(self, now_ms: int) -> None:
        # entries leave roughly in arrival order; stop at the first one still inside the window.
        # A sender whose cache empties is forgotten once its floor is outside the window too.
        limit = now_ms - self.window_ms
        for sender in list(self._senders):
            st = self._senders[sender]
            while st.seen:
                ts = next(iter(st.seen.values()))
                if ts >= limit:
                    break
                st.seen.popitem(last=False)
                self._total -= 1
            if not st.seen and st.floor_ms < limit:
                del self._senders[sender]
