"""The switch app's two tables, bounded and indexed (pure Python, no os-ken).

``FlowTable``: every flow the app installed, by (table, priority, match) and by cookie,
so a flow-removed message finds its flow in O(1) (a scan made aging O(N^2)).
``MacTable``: learned stations with a cap in total and per port, so random source MACs
cannot grow the app or the flow table without bound (security review, finding 5).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

FlowKey = tuple  # (table, priority, sorted match items)


@dataclass
class FlowRec:
    cookie: int
    table: int
    priority: int
    match: dict[str, Any]
    actions: str
    idle: int = 0


class FlowTable:
    """Flows by key, with a cookie index kept in step on every change."""

    def __init__(self) -> None:
        self._by_key: dict[FlowKey, FlowRec] = {}
        self._by_cookie: dict[int, FlowKey] = {}

    def get(self, key: FlowKey) -> FlowRec | None:
        return self._by_key.get(key)

    def __contains__(self, key: FlowKey) -> bool:
        return key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)

    def values(self) -> Iterator[FlowRec]:
        return iter(list(self._by_key.values()))

    def put(self, key: FlowKey, rec: FlowRec) -> None:
        old = self._by_key.get(key)
        if old is not None and old.cookie != rec.cookie:
            self._by_cookie.pop(old.cookie, None)
        self._by_key[key] = rec
        self._by_cookie[rec.cookie] = key

    def pop(self, key: FlowKey) -> FlowRec | None:
        rec = self._by_key.pop(key, None)
        if rec is not None:
            self._by_cookie.pop(rec.cookie, None)
        return rec

    def by_cookie(self, cookie: int) -> FlowRec | None:
        key = self._by_cookie.get(cookie)
        return None if key is None else self._by_key.get(key)

    def pop_cookie(self, cookie: int) -> FlowRec | None:
        """The flow a flow-removed message names, removed; None if already gone."""
        key = self._by_cookie.pop(cookie, None)
        return None if key is None else self._by_key.pop(key, None)

    def clear(self) -> None:
        self._by_key.clear()
        self._by_cookie.clear()


@dataclass
class MacEntry:
    port: int  # where frames to this MAC go (change it through MacTable.set_port: it is counted)
    owner: str | None  # node the MAC lives at (None: not known yet, pointer from last sighting)
    seen: set[tuple[int, int]] = field(default_factory=set)  # markers installed: (in_port, vid)


class MacTable:
    """Learned MACs, at most ``max_total`` and at most ``max_per_port`` per port.

    A MAC over either cap is not learned (``add`` says False, the refusal is counted against
    the port it would have pointed to: ``refused``); an entry already in the table may still
    move to a full port (moves are rare, and the total stays bounded).
    """

    def __init__(self, max_total: int = 8192, max_per_port: int = 1024) -> None:
        self.max_total, self.max_per_port = max_total, max_per_port
        self._macs: dict[bytes, MacEntry] = {}
        self._per_port: Counter[int] = Counter()
        self.refused: Counter[int] = Counter()  # port -> MACs refused there (kept across clear())

    def get(self, mac: bytes) -> MacEntry | None:
        return self._macs.get(mac)

    def __contains__(self, mac: bytes) -> bool:
        return mac in self._macs

    def __len__(self) -> int:
        return len(self._macs)

    def items(self) -> list[tuple[bytes, MacEntry]]:
        return list(self._macs.items())

    def on_port(self, port: int) -> int:
        return self._per_port[port]

    def room(self, port: int) -> bool:
        return len(self._macs) < self.max_total and self._per_port[port] < self.max_per_port

    def add(self, mac: bytes, entry: MacEntry) -> bool:
        if mac in self._macs:
            raise KeyError(f"{mac.hex()} is already learned")
        if not self.room(entry.port):
            self.refused[entry.port] += 1
            return False
        self._macs[mac] = entry
        self._per_port[entry.port] += 1
        return True

    def set_port(self, entry: MacEntry, port: int) -> None:
        if port == entry.port:
            return
        self._release(entry.port)
        entry.port = port
        self._per_port[port] += 1

    def remove(self, mac: bytes) -> MacEntry | None:
        e = self._macs.pop(mac, None)
        if e is not None:
            self._release(e.port)
        return e

    def clear(self) -> None:
        self._macs.clear()
        self._per_port.clear()

    def forget_port(self, port: int) -> None:
        """The port is gone: its refusal count goes too (OVS may give its number to another)."""
        self.refused.pop(port, None)

    def _release(self, port: int) -> None:
        self._per_port[port] -= 1
        if self._per_port[port] <= 0:
            del self._per_port[port]
