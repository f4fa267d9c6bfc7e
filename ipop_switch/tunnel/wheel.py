"""One timer for every link of a process: the deadlines of all links (next keepalive, dead
check, rekey, handshake retry, probe, TURN refresh) on a single event-loop timer that wakes
only at the earliest of them.

Why not a sleep loop per link: 32 links ticking every 0.25 s woke the worker 128 times a
second to find nothing to do (issue 16: ~0.25 % CPU per idle link). Why not one
``loop.call_at`` per deadline: deadlines are rounded *up* to the wheel's ``resolution``
(0.1 s), so the links whose deadlines fall in one slot run in one wake-up, and a link that
moves its deadline does not leave a stale loop timer behind (cancelled entries leave their
slot at once; an emptied slot is dropped, and the loop timer re-armed, without waking).
Nothing here ever fires early: a slot runs at or after its time.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
import weakref
from typing import Callable

RESOLUTION = 0.1
_EARLY = 0.002                # the loop's own timer granularity (libuv: 1 ms)


class Timer:
    """One scheduled call; ``cancel`` it to take it off the wheel."""

    __slots__ = ("when", "fn", "slot", "wheel")

    def __init__(self, wheel: "Wheel", when: float, slot: int, fn: Callable[[], None]) -> None:
        self.wheel: Wheel | None = wheel
        self.when = when
        self.slot = slot
        self.fn = fn

    @property
    def active(self) -> bool:
        return self.wheel is not None

    def cancel(self) -> None:
        if self.wheel is not None:
            self.wheel._remove(self)


class Wheel:
    """Calls ``fn`` at (or up to ``resolution`` after) ``when`` (``time.monotonic()`` seconds).

    ``wakeups`` counts the loop timer's firings (tests and the idle bench check it stays
    near the number of distinct deadlines, not the number of links)."""

    def __init__(self, resolution: float = RESOLUTION, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.resolution = resolution
        self.clock = clock
        self._slots: dict[int, dict[Timer, None]] = {}
        self._heap: list[int] = []            # slot numbers, possibly stale (emptied slots)
        self._armed: int | None = None        # the slot the loop timer is set for
        self._handle: asyncio.TimerHandle | None = None
        self._firing: int | None = None       # while running slots up to this one
        self.wakeups = 0

    def __len__(self) -> int:
        return sum(len(s) for s in self._slots.values())

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        slot = math.ceil(when / self.resolution)
        if self._firing is not None:
            slot = max(slot, self._firing + 1)    # never into the run in progress: next wake-up
        t = Timer(self, when, slot, fn)
        bucket = self._slots.get(slot)
        if bucket is None:
            bucket = self._slots[slot] = {}
            heapq.heappush(self._heap, slot)
        bucket[t] = None
        if self._firing is None and (self._armed is None or slot < self._armed):
            self._arm()
        return t

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        return self.call_at(self.clock() + delay, fn)

    def _remove(self, t: Timer) -> None:
        t.wheel = None
        bucket = self._slots.get(t.slot)
        if bucket is None:
            return
        bucket.pop(t, None)
        if not bucket:
            del self._slots[t.slot]
            if t.slot == self._armed and self._firing is None:
                self._arm()                   # nothing left at that time: do not wake for it

    def _arm(self) -> None:
        heap = self._heap
        while heap and heap[0] not in self._slots:
            heapq.heappop(heap)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not heap:
            self._armed = None
            return
        self._armed = heap[0]
        delay = max(0.0, heap[0] * self.resolution - self.clock())
        self._handle = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed = None
        self.wakeups += 1
        due = self._firing = math.floor((self.clock() + _EARLY) / self.resolution)
        heap = self._heap
        try:
            while heap and heap[0] <= due:
                bucket = self._slots.pop(heapq.heappop(heap), None)
                for t in list(bucket or ()):
                    if t.wheel is None:
                        continue
                    t.wheel = None
                    try:
                        t.fn()
                    except Exception as e:    # one link's bug must not stop the others' timers
                        asyncio.get_running_loop().call_exception_handler(
                            {"message": "wheel timer callback failed", "exception": e})
        finally:
            self._firing = None
            self._arm()


_wheels: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Wheel]" = weakref.WeakKeyDictionary()


def wheel() -> Wheel:
    """The wheel of the running event loop (one per process in a pool process)."""
    loop = asyncio.get_running_loop()
    w = _wheels.get(loop)
    if w is None:
        w = _wheels[loop] = Wheel()
    return w
