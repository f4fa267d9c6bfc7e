"""Link-state advertisements: how every node learns the overlay graph.

Each node originates an LSA ``{origin, epoch, seq, neighbours}``: the peers of its links
that are up. ``epoch`` is the agent's start time in ms, so after a restart (seq back to 0)
the new LSAs still win over the old ones; ``seq`` grows with every change. The agent
sends its LSA over signaling to every member when it changes, and every member sends its
own to a newcomer; LSAs of members that left are dropped. The graph handed to the switch
app (``set_topology``) has the edges both ends claim, plus this node's own up links, which
are authoritative: a half-announced link (one end's LSA not there yet) is left out rather
than trusted, so a dead node's stale claims never route frames.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Mapping

from .ring import position


@dataclass(frozen=True)
class LSA:
    origin: str
    epoch: int                  # the origin's start time, ms
    seq: int                    # per epoch, +1 per change
    neighbours: tuple[str, ...]  # peers of the origin's up links, sorted

    @property
    def version(self) -> tuple[int, int]:
        return (self.epoch, self.seq)

    def to_dict(self) -> dict:
        return {"origin": self.origin, "epoch": self.epoch, "seq": self.seq, "neighbours": list(self.neighbours)}

    def encode(self) -> bytes:
        """The wire form (compact JSON); its length is what the simulator counts."""
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, d: Mapping) -> "LSA":
        """Parse and validate a received LSA; ValueError on anything malformed."""
        try:
            origin, epoch, seq, nbrs = d["origin"], d["epoch"], d["seq"], d["neighbours"]
        except (KeyError, TypeError):
            raise ValueError("LSA: needs origin, epoch, seq, neighbours") from None
        if not isinstance(origin, str) or not isinstance(nbrs, list):
            raise ValueError("LSA: origin must be a node id and neighbours a list")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (epoch, seq)):
            raise ValueError("LSA: epoch and seq must be integers >= 0")
        position(origin)
        for n in nbrs:
            if not isinstance(n, str):
                raise ValueError("LSA: neighbours must be node ids")
            position(n)
        return cls(origin, epoch, seq, tuple(sorted(set(nbrs) - {origin})))


class LsaOriginator:
    """This node's own LSA: a new one (seq + 1) whenever its up links change."""

    def __init__(self, me: str, epoch_ms: int):
        self.me, self.epoch, self.seq = me, int(epoch_ms), 0
        self.current: LSA | None = None

    def update(self, up_links: Iterable[str]) -> LSA | None:
        """The new LSA to send, or None when the neighbours did not change."""
        nbrs = tuple(sorted(set(up_links) - {self.me}))
        if self.current is not None and self.current.neighbours == nbrs:
            return None
        self.seq += 1
        self.current = LSA(self.me, self.epoch, self.seq, nbrs)
        return self.current


class LinkStateDB:
    """The latest LSA of every other member, merged by (epoch, seq)."""

    def __init__(self) -> None:
        self._lsas: dict[str, LSA] = {}

    def __len__(self) -> int:
        return len(self._lsas)

    def __contains__(self, origin: object) -> bool:
        return origin in self._lsas

    def get(self, origin: str) -> LSA | None:
        return self._lsas.get(origin)

    def origins(self) -> set[str]:
        return set(self._lsas)

    def versions(self) -> dict[str, tuple[int, int]]:
        return {o: l.version for o, l in self._lsas.items()}

    def update(self, lsa: LSA) -> bool:
        """Store ``lsa`` if it is newer than what we have for its origin. True: changed."""
        old = self._lsas.get(lsa.origin)
        if old is not None and old.version >= lsa.version:
            return False
        self._lsas[lsa.origin] = lsa
        return True

    def remove(self, origin: str) -> bool:
        """The origin left the overlay. True: we had its LSA."""
        return self._lsas.pop(origin, None) is not None

    def retain(self, members: Iterable[str]) -> list[str]:
        """Drop the LSAs of everyone not in ``members``; returns the dropped origins."""
        keep = set(members)
        gone = [o for o in self._lsas if o not in keep]
        for o in gone:
            del self._lsas[o]
        return gone

    def edges(self, me: str, my_up: Iterable[str]) -> set[tuple[str, str]]:
        """The overlay graph for the switch app: edges (a, b), a < b, both ends claim;
        plus my own up links (my end is authoritative; others' claims on me are ignored)."""
        out = {(me, p) if me < p else (p, me) for p in my_up if p != me}
        for a, lsa in self._lsas.items():
            if a == me:
                continue
            for b in lsa.neighbours:
                if a < b and b != me:
                    other = self._lsas.get(b)
                    if other is not None and a in other.neighbours:
                        out.add((a, b))
        return out
