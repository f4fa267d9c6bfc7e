"""Traffic per peer over a sliding window: the input of on-demand links.

The agent (or the simulator) reports bytes exchanged with a peer as they are counted
(flows towards a peer's MACs for peers reached over other nodes, the link's counters for
linked peers); ``rate`` is bits per second over the last ``window`` seconds, kept in
``buckets`` slots so the cost per peer is fixed. Time is passed in: no clock here.
"""

from __future__ import annotations


class OnDemand:
    """Per-peer byte counts in a ring of time buckets covering ``window`` seconds."""

    def __init__(self, window: float = 10.0, buckets: int = 10):
        if window <= 0 or buckets < 1:
            raise ValueError("on-demand window must be > 0 s and buckets >= 1")
        self.window = float(window)
        self.buckets = buckets
        self.width = self.window / buckets
        self._counts: dict[str, dict[int, int]] = {}  # peer -> {bucket number: bytes}

    def observe(self, peer: str, nbytes: int, now: float) -> None:
        """``nbytes`` exchanged with ``peer`` (both directions) around time ``now``."""
        if nbytes <= 0:
            return
        b = int(now // self.width)
        slots = self._counts.setdefault(peer, {})
        slots[b] = slots.get(b, 0) + nbytes
        if len(slots) > self.buckets + 1:
            self._trim(slots, b)

    def _trim(self, slots: dict[int, int], current: int) -> None:
        for old in [k for k in slots if k <= current - self.buckets]:
            del slots[old]

    def rate(self, peer: str, now: float) -> float:
        """Bits per second with ``peer`` over the last window (0 when unknown)."""
        slots = self._counts.get(peer)
        if not slots:
            return 0.0
        current = int(now // self.width)
        self._trim(slots, current)
        if not slots:
            del self._counts[peer]
            return 0.0
        return 8.0 * sum(slots.values()) / self.window

    def rates(self, now: float) -> dict[str, float]:
        """Every peer with traffic in the window -> bits per second."""
        out = {}
        for peer in list(self._counts):
            r = self.rate(peer, now)
            if r > 0:
                out[peer] = r
        return out

    def forget(self, peer: str) -> None:
        self._counts.pop(peer, None)
