"""The overlay's topology at this node: which links it keeps (``topology.TopologyPolicy``),
what it tells the others about its links (LSAs) and the graph it hands the switch app.

The agent's glue around the pure code of ``ipop_switch/topology/`` (docs/topology.md).
The overlay owns the links; this class decides which ones, through four callables
(``Hooks``), and speaks the small link-negotiation protocol over signaling:

- ``link_request {role}``: "I want a link with you, as my <role>". The peer answers
  ``link_accept`` (both ends then open the link worker) or ``link_refuse`` (at its degree
  cap: the requester backs off from it and, for a long link, draws another target).
- ``link_release``: "I no longer need our link" (the peer keeps it while it wants it;
  if it does not either, it drops it).
- ``link_drop {reason?}``: "I closed our link": the peer closes its end too. With
  ``reason: "no_path"`` the link never came up within ``request_timeout`` (no direct path
  and no relay): the peer backs off too, so neither end retries before its back-off ends.
- ``lsa {origin, epoch, seq, neighbours}``: the sender's up links, sent to every member
  when they change and to each newcomer; merged by (epoch, seq), so stale or replayed
  ones are ignored, and one whose origin is not its (verified) sender is dropped.

Peer-assisted traversal (docs/topology.md): a pair that finds no path between them (both
behind hard NATs without TURN, UDP blocked between them) is recorded as failed directly,
retried only after a back-off that doubles (``retry_backoff`` x1..x8), and meanwhile
reaches each other through a member linked to both: the link never enters an LSA, so the
switch app's graph lacks it and its routes and flood trees go around it. ``annotate`` puts
"peer-assisted via <node>" (or "unreachable") in the status rows of such peers.

Nothing here blocks the event loop for long: ``decide`` runs every ``cycle`` seconds and
shortly after an event (member joined or left, refusal, link up or gone), and the graph
is pushed to the switch app at most every ``GRAPH_DEBOUNCE`` seconds, and only when it
changed (the app's plan is O(N·(N+E)): 0.8 s at 1000 nodes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

from ..aio import cancel_and_wait
from ..topology import LSA, LinkStateDB, LsaOriginator, ROLES, TopologyParams, TopologyPolicy

log = logging.getLogger("ipop_switch.agent")

REQUEST, ACCEPT, REFUSE, RELEASE, DROP, LSA_TYPE = (
    "link_request", "link_accept", "link_refuse", "link_release", "link_drop", "lsa")
MESSAGE_TYPES = (REQUEST, ACCEPT, REFUSE, RELEASE, DROP, LSA_TYPE)
NO_PATH = "no_path"      # link_drop reason: the link never came up (no direct path, no relay)
# a status row for a member without a link: the keys of a link's row (readers index them)
NO_LINK_ROW = {"path": None, "candidates": None, "remote_addr": None, "local_addr": None, "rtt_ms": None,
               "tx_frames": 0, "tx_bytes": 0, "rx_frames": 0, "rx_bytes": 0, "drops": {}, "last_handshake_s": None,
               "uptime_s": None, "port": None, "ups": 0, "last_reason": ""}
DECIDE_SOON = 0.2        # s after an event before deciding (events come in bursts)
GRAPH_DEBOUNCE = 0.2     # s: graph changes within this are pushed together


@dataclass
class Hooks:
    """What the topology needs from its overlay."""

    members: Callable[[], Iterable[str]]                    # verified members (not me)
    send: Callable[[str, str, dict], Awaitable[None]]       # signaling message to a member
    open_link: Callable[[str], Awaitable[bool]]             # start the link worker (idempotent)
    close_link: Callable[[str, str], Awaitable[None]]       # stop it (no-op without one)
    up_links: Callable[[], Iterable[str]]                   # peers whose link is up now
    set_topology: Callable[[list[tuple[str, str]]], Awaitable[None]]


class OverlayTopology:
    def __init__(self, me: str, params: TopologyParams, hooks: Hooks, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.me = me
        self.params = params
        self.hooks = hooks
        self.clock = clock
        self.policy = TopologyPolicy(me, params)
        self.lsa = LsaOriginator(me, int(time.time() * 1000))
        self.db = LinkStateDB()
        self.drops: Counter[str] = Counter()     # topology messages dropped, by reason
        self.sent: Counter[str] = Counter()      # messages sent, by type
        self.last_decision = None
        self._pushed: list[tuple[str, str]] | None = None
        self._decide_soon: asyncio.TimerHandle | None = None
        self._graph_task: asyncio.Task | None = None
        self._graph_dirty = False
        self._task: asyncio.Task | None = None
        self._busy = asyncio.Lock()
        self._recent: deque[float] = deque(maxlen=64)   # decide() durations (status)
        # peers we found no path to (a link that never came up): peer -> failure record,
        # forgotten once a link with it is up or it leaves (status: "direct_failed")
        self.direct_failed: dict[str, dict] = {}

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._cycle(), name="topology")

    async def stop(self) -> None:
        if self._decide_soon is not None:
            self._decide_soon.cancel()
        await cancel_and_wait(self._task, self._graph_task)

    async def _cycle(self) -> None:
        while True:
            try:
                await self.decide()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=topology_decide_failed")
            await asyncio.sleep(self.params.cycle)

    def poke(self) -> None:
        """Decide again shortly (events come in bursts: one decision for the burst)."""
        if self._decide_soon is None:
            loop = asyncio.get_running_loop()
            self._decide_soon = loop.call_later(DECIDE_SOON, self._poked)

    def _poked(self) -> None:
        self._decide_soon = None
        asyncio.ensure_future(self._decide_logged())

    async def _decide_logged(self) -> None:
        try:
            await self.decide()
        except Exception:
            log.exception("event=topology_decide_failed")

    # -- the decision -------------------------------------------------------------------
    def members(self) -> set[str]:
        return set(self.hooks.members()) | {self.me}

    async def decide(self) -> None:
        """One run of the policy on the current members, and its actions."""
        async with self._busy:
            now = self.clock()
            members = self.members()
            self.db.retain(members)
            degrees = {o: len(self.db.get(o).neighbours) for o in self.db.origins()}  # type: ignore[union-attr]
            t0 = time.perf_counter()
            d = self.policy.decide(now, members, degrees)
            self._recent.append(time.perf_counter() - t0)
            self.last_decision = d
            for peer, role in d.open:
                await self._send(peer, REQUEST, {"role": role})
            for peer in d.release:
                await self._send(peer, RELEASE, {})
            for peer in d.close:
                if peer in d.timed_out:
                    self._direct_failed(peer, now, f"no path within {self.params.request_timeout:g}s")
                    await self.hooks.close_link(peer, "topology: no path")
                    await self._send(peer, DROP, {"reason": NO_PATH})
                    continue
                await self.hooks.close_link(peer, "topology: not needed")
                await self._send(peer, DROP, {})
            for peer in [q for q in self.direct_failed   # a failed peer we no longer try to link
                         if q not in d.roles and not self.policy.backoff(q, now)]:
                del self.direct_failed[peer]
            if d.changed:
                log.info("event=topology_decision open=%s release=%s close=%s",
                         ",".join(f"{p[:8]}:{r}" for p, r in d.open) or "-",
                         ",".join(p[:8] for p in d.release) or "-", ",".join(p[:8] for p in d.close) or "-")
        self.graph_changed()

    async def _send(self, peer: str, type_: str, payload: dict) -> None:
        try:
            await self.hooks.send(peer, type_, payload)
            self.sent[type_] += 1
        except Exception as e:
            log.debug("event=topology_send_failed peer=%s type=%s error=%s", peer, type_, e)

    # -- protocol -----------------------------------------------------------------------
    def knows(self, peer: str) -> bool:
        """The policy has (or is negotiating) a link with ``peer``: its link messages are welcome."""
        return peer in self.policy.roles()

    async def on_message(self, peer: str, type_: str, payload: dict) -> None:
        """A topology message from a verified member (signed by ``peer``)."""
        now = self.clock()
        if type_ == LSA_TYPE:
            try:
                lsa = LSA.from_dict(payload)
            except ValueError as e:
                self.drops["lsa_malformed"] += 1
                log.info("event=lsa_dropped peer=%s reason=%s", peer, e)
                return
            if lsa.origin != peer:           # a member speaks only for itself
                self.drops["lsa_not_origin"] += 1
                return
            if self.db.update(lsa):
                self.graph_changed()
                self.poke()                  # degrees for long-link draws changed
            else:
                self.drops["lsa_stale"] += 1
            return
        if type_ == REQUEST:
            role = payload.get("role")
            if role not in ROLES:
                self.drops["bad_role"] += 1
                await self._send(peer, REFUSE, {"reason": "bad role"})
                return
            async with self._busy:
                ok = self.policy.accept_incoming(peer, role, now)
            if ok:
                if await self.hooks.open_link(peer):
                    await self._send(peer, ACCEPT, {})
                    return
                async with self._busy:
                    self.policy.link_down(peer, now)
            log.info("event=link_request_refused peer=%s role=%s degree=%d", peer, role, self.policy.degree)
            await self._send(peer, REFUSE, {"reason": "degree"})
        elif type_ == ACCEPT:
            if self.knows(peer):
                if not await self.hooks.open_link(peer):
                    async with self._busy:
                        self.policy.link_down(peer, now)
                    await self._send(peer, DROP, {})
            else:                            # we gave up on it meanwhile
                await self._send(peer, DROP, {})
        elif type_ == REFUSE:
            async with self._busy:
                self.policy.refused(peer, now)
                gone = not self.knows(peer)
            if gone:
                await self.hooks.close_link(peer, "topology: refused")
            self.poke()
        elif type_ == RELEASE:
            async with self._busy:
                close = self.policy.released(peer, now)
            if close:
                await self.hooks.close_link(peer, "topology: released by both")
                await self._send(peer, DROP, {})
        elif type_ == DROP:
            no_path = payload.get("reason") == NO_PATH and peer in self.policy.roles() \
                and peer not in self.policy.up_links()
            async with self._busy:
                self.policy.link_down(peer, now, failed=no_path)
            if no_path and self.policy.backoff(peer, now):      # we wanted it: retried after the back-off
                self._direct_failed(peer, now, "the peer found no path")
            await self.hooks.close_link(peer, "topology: no path (peer)" if no_path else "topology: dropped by peer")
            self.poke()

    def _direct_failed(self, peer: str, now: float, reason: str) -> None:
        """Record that no path to ``peer`` was found (the policy backed off from it)."""
        rec = self.direct_failed.setdefault(peer, {"since": now, "failures": 0})
        rec["failures"] += 1
        rec["reason"] = reason
        b = self.policy.backoff(peer, now)
        log.info("event=direct_path_failed peer=%s failures=%d retry_in=%s reason=%s", peer, rec["failures"],
                 f"{b[0]:.0f}s" if b else "-", reason)

    async def drop_stale(self, peer: str) -> None:
        """A link message for a link we do not have nor want: the peer's end is stale."""
        await self._send(peer, DROP, {})

    # -- events from the overlay ----------------------------------------------------------
    def member_appeared(self, peer: str) -> None:
        """A member (new, or back): it gets our LSA; the policy looks again."""
        cur = self.lsa.current
        if cur is not None:
            asyncio.ensure_future(self._send(peer, LSA_TYPE, cur.to_dict()))
        self.poke()

    def member_left(self, peer: str) -> None:
        self.db.remove(peer)
        self.direct_failed.pop(peer, None)
        self.policy.link_down(peer, self.clock())
        self.graph_changed()
        self.poke()

    def link_up(self, peer: str) -> None:
        self.policy.link_up(peer, self.clock())
        if self.direct_failed.pop(peer, None) is not None:
            log.info("event=direct_path_found peer=%s", peer)
        self.links_changed()

    def link_down(self, peer: str) -> None:
        """The link's path died (its worker tries again): not in our LSA until it is back."""
        self.links_changed()

    def link_closed(self, peer: str, *, failed: bool = False) -> None:
        """The overlay closed the link for its own reasons (certificate changed, shutdown)."""
        self.policy.link_down(peer, self.clock(), failed)
        self.links_changed()

    def traffic(self, per_peer: dict[str, int]) -> None:
        """Bytes exchanged with each member since the last call (linked or reached in hops)."""
        now = self.clock()
        for peer, n in per_peer.items():
            if peer != self.me and n > 0:
                self.policy.traffic(peer, n, now)

    def links_changed(self) -> None:
        """Our up links changed: a new LSA to every member, and the graph."""
        lsa = self.lsa.update(self.hooks.up_links())
        if lsa is not None:
            payload = lsa.to_dict()
            for m in self.hooks.members():
                asyncio.ensure_future(self._send(m, LSA_TYPE, payload))
        self.graph_changed()
        self.poke()

    # -- the graph for the switch app -------------------------------------------------------
    def edges(self) -> list[tuple[str, str]]:
        """The graph for the switch app. A link of ours is in it once it is up here *and* the
        peer's LSA has it: the peer adds its port before it sends that LSA, so frames we send
        on a new link are never dropped at a port the peer's switch does not know yet (an
        on-demand link takes a flow over without loss). The app uses a port only once the
        graph has it."""
        confirmed = [p for p in self.hooks.up_links()
                     if (lsa := self.db.get(p)) is not None and self.me in lsa.neighbours]
        return sorted(self.db.edges(self.me, confirmed))

    def graph_changed(self) -> None:
        self._graph_dirty = True
        if self._graph_task is None or self._graph_task.done():
            self._graph_task = asyncio.create_task(self._push_graph(), name="topology-graph")

    async def _push_graph(self) -> None:
        while self._graph_dirty:
            await asyncio.sleep(GRAPH_DEBOUNCE)
            self._graph_dirty = False
            edges = self.edges()
            if edges == self._pushed:
                continue
            try:
                await self.hooks.set_topology(edges)
                self._pushed = edges
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("event=set_topology_failed error=%s", e)
                self._graph_dirty = True
                await asyncio.sleep(1.0)

    async def flush(self) -> None:
        """Push the graph now if it changed (after the switch app restarted, and in tests)."""
        self._pushed = None
        self.graph_changed()

    # -- status ----------------------------------------------------------------------------
    def _adj(self) -> dict[str, set[str]]:
        adj: dict[str, set[str]] = {}
        for a, b in self.edges():
            adj.setdefault(a, set()).add(b)
            adj.setdefault(b, set()).add(a)
        return adj

    @staticmethod
    def _bfs(adj: dict[str, set[str]], src: str) -> dict[str, int]:
        dist = {src: 0}
        frontier = [src]
        while frontier:
            nxt = []
            for u in frontier:
                for v in adj.get(u, ()):
                    if v not in dist:
                        dist[v] = dist[u] + 1
                        nxt.append(v)
            frontier = nxt
        return dist

    def hops(self) -> dict[str, int]:
        """Hops to every member reachable in the graph (BFS from me)."""
        dist = self._bfs(self._adj(), self.me)
        dist.pop(self.me)
        return dist

    def routes(self, targets: Iterable[str]) -> dict[str, tuple[int, str]]:
        """target -> (hops, next hop) for the reachable ``targets``. The next hop is the one the
        switch app sends to: its parent in the target's flood tree, the neighbour w with the
        smallest (hops from the target, w) (ryu_apps/flood.py ``tree_parent``, the rule its
        learned MACs follow). One BFS per target: status asks only for the few peers that have
        no link of their own."""
        adj = self._adj()
        mine = adj.get(self.me, set())
        out: dict[str, tuple[int, str]] = {}
        for t in targets:
            if t == self.me or t not in adj:
                continue
            dist = self._bfs(adj, t)
            if self.me not in dist:
                continue
            best = min(((dist[w], w) for w in mine if w in dist), default=None)
            if best is not None:
                out[t] = (dist[self.me], best[1])
        return out

    def annotate(self, peers: list[dict], subject: Callable[[str], str | None] = lambda _: None) -> list[dict]:
        """How each peer is reached, for the status rows (``peers`` from the overlay: one per
        link, any state). ``reach``: "direct" (its link is up), "peer-assisted" (through
        ``via``, ``hops`` >= 2: path "peer-assisted") or "unreachable"; ``direct_failed``: no
        path found to it, the failures in a row and when it is tried again. Rows are added
        for peers without a link that we want one with (every member while all-to-all) or
        found no path to: state "backoff" (waiting to try again) or "waiting"."""
        now = self.clock()
        n = len(self.members())
        rows = {p["node_id"]: p for p in peers}
        extra = set(self.direct_failed)
        if not self.params.structured(n):
            extra |= set(self.hooks.members())
        for peer in sorted(extra - set(rows) - {self.me}):
            rows[peer] = {**NO_LINK_ROW, "drops": {}, "node_id": peer, "subject": subject(peer) or "",
                          "state": "backoff" if self.policy.backoff(peer, now) else "waiting",
                          "role": self.policy.roles().get(peer)}
            peers.append(rows[peer])
        peers.sort(key=lambda p: p["node_id"])
        routes = self.routes(p for p, r in rows.items() if r.get("state") != "up")
        for peer, row in rows.items():
            if row.get("state") == "up":
                row.update(reach="direct", hops=1, via=None)
            elif peer in routes:
                hops, via = routes[peer]
                row.update(reach="peer-assisted", path="peer-assisted", hops=hops, via=via)
            else:
                row.update(reach="unreachable", hops=None, via=None)
            rec = self.direct_failed.get(peer)
            if rec is not None:
                b = self.policy.backoff(peer, now)
                row["direct_failed"] = {"failures": rec["failures"], "reason": rec.get("reason", ""),
                                        "for_s": round(now - rec["since"], 1),
                                        "retry_in_s": round(b[0], 1) if b else 0.0}
        return peers

    def snapshot(self) -> dict:
        members = self.members()
        n = len(members)
        hops = self.hops()
        roles = self.policy.roles()
        return {
            "mode": "structured" if self.params.structured(n) else "all-to-all",
            "members": n,
            "degree": self.policy.degree,
            "max_degree": self.params.max_degree,
            "roles": dict(Counter(roles.values())),
            "reachable": len(hops),
            "unreachable": sorted(m for m in members if m != self.me and m not in hops),
            "max_hops": max(hops.values(), default=0),
            "hops": hops,                            # member -> hops through the graph
            "direct_failed": sorted(self.direct_failed),   # no path found to these: backed off
            "lsas": len(self.db),
            "lsa_seq": self.lsa.seq,
            "edges": len(self.edges()),
            "refused_requests": self.policy.refusals,
            "drops": dict(self.drops),
            "sent": dict(self.sent),
            "decide_ms_max": round(1000 * max(self._recent, default=0.0), 2),
        }
