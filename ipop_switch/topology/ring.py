"""Node ids as points on the 128-bit identifier ring.

A node id is 32 hex digits; its position is ``int(id, 16)``. Clockwise order is
increasing position, wrapping at 2**128. The ring is built once per member set and shared
(the simulator hands the same ``Ring`` to every node), so lookups are bisections.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Iterable

RING_BITS = 128
RING_SIZE = 1 << RING_BITS


def position(node_id: str) -> int:
    """The ring position of a node id (32 hex digits); ValueError otherwise."""
    if len(node_id) != 32:
        raise ValueError(f"node id {node_id!r}: expected 32 hex digits")
    try:
        return int(node_id, 16)
    except ValueError:
        raise ValueError(f"node id {node_id!r}: expected 32 hex digits") from None


def distance(a: str, b: str) -> int:
    """Clockwise distance from a to b (0 .. RING_SIZE-1)."""
    return (position(b) - position(a)) % RING_SIZE


class Ring:
    """An immutable, sorted member set with clockwise lookups."""

    __slots__ = ("ids", "positions", "_index", "_frozen")

    def __init__(self, members: Iterable[str]):
        pairs = sorted((position(m), m) for m in set(members))
        self.positions = [p for p, _ in pairs]
        self.ids = [m for _, m in pairs]
        self._index = {m: i for i, m in enumerate(self.ids)}
        self._frozen: frozenset[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._index

    def __iter__(self):
        return iter(self.ids)

    @property
    def members(self) -> frozenset[str]:
        if self._frozen is None:
            self._frozen = frozenset(self.ids)
        return self._frozen

    def successor_of_point(self, point: int) -> str:
        """The first member at or clockwise after ``point``."""
        if not self.ids:
            raise ValueError("empty ring")
        i = bisect_left(self.positions, point % RING_SIZE)
        return self.ids[i % len(self.ids)]

    def _at(self, me: str) -> int:
        """Index of me, or of the slot me would take if it is not a member."""
        i = self._index.get(me)
        return i if i is not None else bisect_right(self.positions, position(me)) - 1

    def successors(self, me: str, k: int) -> list[str]:
        """The next k members clockwise after me (fewer if the ring is smaller), me excluded."""
        n = len(self.ids)
        if n == 0:
            return []
        i = self._at(me)
        out: list[str] = []
        for step in range(1, n + 1):
            m = self.ids[(i + step) % n]
            if m == me or m in out:
                continue
            out.append(m)
            if len(out) == k:
                break
        return out

    def predecessors(self, me: str, k: int) -> list[str]:
        """The k members counter-clockwise before me (nearest first), me excluded."""
        n = len(self.ids)
        if n == 0:
            return []
        i = self._index.get(me)
        start = i if i is not None else bisect_left(self.positions, position(me))
        out: list[str] = []
        for step in range(1, n + 1):
            m = self.ids[(start - step) % n]
            if m == me or m in out:
                continue
            out.append(m)
            if len(out) == k:
                break
        return out
