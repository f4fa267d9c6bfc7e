"""Topology agents (``agent/topology.py``) of a whole overlay wired together in one process:
signaling messages through queues, links up when both ends opened them (and the pair is
not ``blocked``), each node's graph kept. For unit tests of the agent's protocol."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Callable

from ipop_switch.agent.topology import REQUEST, Hooks, OverlayTopology
from ipop_switch.topology import TopologyParams


def node_id(prefix: str, i: int) -> str:
    return hashlib.md5(f"{prefix}{i}".encode()).hexdigest()


class Net:
    """``n`` nodes with ids ``node_id(prefix, i)``; ``fake_clock``: the agents read ``now``."""

    def __init__(self, n: int, params: TopologyParams, *, prefix: str = "node", fake_clock: bool = False) -> None:
        self.ids = [node_id(prefix, i) for i in range(n)]
        self.params = params
        self.now = 1000.0
        self.blocked: set[frozenset[str]] = set()
        self.open: dict[str, set[str]] = {i: set() for i in self.ids}     # who opened a link to whom
        self.graphs: dict[str, list] = {}
        self.inbox: dict[str, asyncio.Queue] = {i: asyncio.Queue() for i in self.ids}
        self.present = set(self.ids)
        self.sent: list[tuple[str, str, str, dict]] = []
        clock: dict[str, Callable[[], float]] = {"clock": lambda: self.now} if fake_clock else {}
        self.nodes = {me: OverlayTopology(me, params, self._hooks(me), **clock) for me in self.ids}

    def up(self, a: str, b: str) -> bool:
        return b in self.open[a] and a in self.open[b] and frozenset((a, b)) not in self.blocked

    def _hooks(self, me: str) -> Hooks:
        async def send(to: str, type_: str, payload: dict) -> None:
            self.sent.append((me, to, type_, payload))
            if to in self.present:
                self.inbox[to].put_nowait((me, type_, payload))

        async def open_link(peer: str) -> bool:
            if peer not in self.open[me]:
                self.open[me].add(peer)
                if self.up(me, peer):               # both ends: the link is up at both
                    self.nodes[me].link_up(peer)
                    self.nodes[peer].link_up(me)
            return True

        async def close_link(peer: str, reason: str) -> None:
            if peer in self.open[me]:
                was_up = self.up(me, peer)
                self.open[me].discard(peer)
                if was_up:                          # the other end sees the path go
                    self.nodes[peer].link_down(me)
                self.nodes[me].link_closed(peer)

        async def set_topology(edges: list) -> None:
            self.graphs[me] = edges

        return Hooks(members=lambda: [m for m in self.present if m != me], send=send, open_link=open_link,
                     close_link=close_link, up_links=lambda: [p for p in self.open[me] if self.up(me, p)],
                     set_topology=set_topology)

    async def pump(self, rounds: int = 3) -> None:
        """Deliver messages and run decisions until quiet (bounded)."""
        for _ in range(rounds):
            for me in list(self.present):
                await self.nodes[me].decide()
            for _ in range(50):
                busy = False
                for me in list(self.present):
                    q = self.inbox[me]
                    while not q.empty():
                        busy = True
                        frm, type_, payload = q.get_nowait()
                        if frm in self.present:
                            await self.nodes[me].on_message(frm, type_, payload)
                await asyncio.sleep(0)
                if not busy:
                    break
        await asyncio.sleep(0.5)                    # the graph pushes (debounced)

    def up_edges(self) -> set[tuple[str, str]]:
        return {tuple(sorted((a, b))) for a in self.present for b in self.open[a] if self.up(a, b) and b in self.present}

    def leave(self, who: str) -> None:
        self.present.discard(who)
        for m in self.present:
            if who in self.open[m]:
                self.open[m].discard(who)
                self.nodes[m].link_closed(who)
            self.nodes[m].member_left(who)

    def requests(self, a: str, b: str) -> int:
        return sum(1 for f, t, ty, _ in self.sent if ty == REQUEST and {f, t} == {a, b})

    async def stop(self) -> None:
        for t in self.nodes.values():
            await t.stop()
