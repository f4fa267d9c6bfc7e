"""Link summaries of the whole overlay, for the web view (docs/web.md), at a cost only
while someone looks.

Every node knows the overlay's graph from the LSAs (``agent/topology.py``), but only its own
links in detail. A node whose page is open (a *viewer*) asks every member for a small
summary of its links over signaling (signed and sealed like every message):

- ``sum_subscribe {lease}``: "send me your summary for the next ``lease`` seconds" (at most
  ``MAX_LEASE``; 0 cancels). The viewer renews it every ``RENEW`` s while its page is open.
- ``link_summary {v, seq, links, more}``: the sender's links (peer, state, path
  direct/relay, RTT, current tx/rx rate, role, uptime, candidate types, handshake age, drops),
  every ``INTERVAL`` s to each subscriber whose lease runs.

So a node sends nothing when nobody watches, and one message per viewer every 2 s when
someone does: the cost grows with the number of open pages, not with N squared. Bad input
(malformed, too big, from a non-member, not asked for, too many subscribers) is dropped and
counted under ``drops``; nothing here raises on a peer's message.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

from ..aio import cancel_and_wait
from ..signaling.protocol import NODE_ID_RE, body_size

log = logging.getLogger("ipop_switch.agent")

SUBSCRIBE, SUMMARY = "sum_subscribe", "link_summary"
MESSAGE_TYPES = (SUBSCRIBE, SUMMARY)
VERSION = 1
INTERVAL = 2.0            # s between two summaries to a subscriber
LEASE = 30.0              # s a viewer asks for
MAX_LEASE = 60.0          # s a subscription may ask for at most
RENEW = 10.0              # s between a viewer's renewals (a third of the lease: two may be lost)
WATCH_IDLE = 10.0         # s a viewer keeps subscribing after the page last asked
STALE = 7.0               # s without a summary from a subscribed member: it is marked down
MAX_SUBSCRIBERS = 32      # viewers one node serves at once (more are dropped and counted)
MAX_VIEW = 64             # members one viewer subscribes to (its neighbours first; the rest drawn from LSAs)
MAX_LINKS = 48            # links in one summary (the busiest; 'more' counts the rest)
MAX_DROPS = 6             # drop reasons per link in a summary
MAX_BYTES = 12 * 1024     # a summary's JSON (signaling's own limit is 16 KiB)
PATHS = (None, "direct", "relay")
STATES = ("up", "connecting")


class SummaryError(ValueError):
    """A received summary or subscription that does not parse (counted, never raised further)."""


@dataclass(frozen=True)
class LinkSummary:
    """One link as its end reports it."""

    peer: str
    state: str
    path: str | None
    rtt_ms: float | None
    tx_bps: float
    rx_bps: float
    role: str | None
    uptime_s: float | None
    candidates: str | None = None
    handshake_s: float | None = None
    drops: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"peer": self.peer, "state": self.state, "path": self.path, "rtt_ms": self.rtt_ms,
                "tx_bps": self.tx_bps, "rx_bps": self.rx_bps, "role": self.role, "uptime_s": self.uptime_s,
                "cand": self.candidates, "hs_s": self.handshake_s, "drops": self.drops}


def _num(d: dict, key: str, *, optional: bool) -> float | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or v > 1e15:
        raise SummaryError(f"{key}: not a number >= 0")
    return float(v)


def _short(d: dict, key: str, n: int) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > n or not v.isprintable():
        raise SummaryError(f"{key}: not a short string")
    return v


def parse_link(d: Any) -> LinkSummary:
    if not isinstance(d, dict):
        raise SummaryError("a link is not an object")
    peer = d.get("peer")
    if not isinstance(peer, str) or not NODE_ID_RE.match(peer):
        raise SummaryError("peer: not a node id")
    if d.get("state") not in STATES:
        raise SummaryError("state: not up or connecting")
    if d.get("path") not in PATHS:
        raise SummaryError("path: not direct or relay")
    drops = d.get("drops") or {}
    if not isinstance(drops, dict) or len(drops) > MAX_DROPS:
        raise SummaryError("drops: not a small object")
    clean: dict[str, int] = {}
    for k, v in drops.items():
        if not isinstance(k, str) or len(k) > 32 or not k.isprintable() or isinstance(v, bool) \
                or not isinstance(v, int) or v < 0:
            raise SummaryError("drops: reason -> count")
        clean[k] = v
    return LinkSummary(peer, d["state"], d.get("path"), _num(d, "rtt_ms", optional=True),
                       _num(d, "tx_bps", optional=False), _num(d, "rx_bps", optional=False),  # type: ignore[arg-type]
                       _short(d, "role", 16), _num(d, "uptime_s", optional=True), _short(d, "cand", 40),
                       _num(d, "hs_s", optional=True), clean)


def parse_summary(payload: Any) -> tuple[int, list[LinkSummary], int]:
    """(seq, links, more) of a ``link_summary`` body; SummaryError naming what is wrong."""
    if not isinstance(payload, dict) or payload.get("v") != VERSION:
        raise SummaryError("not a version-1 summary")
    try:
        size = body_size(payload)
    except ValueError:
        raise SummaryError("not plain JSON") from None
    if size > MAX_BYTES:
        raise SummaryError(f"{size} bytes (at most {MAX_BYTES})")
    seq, more, links = payload.get("seq"), payload.get("more", 0), payload.get("links")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise SummaryError("seq: not a count")
    if isinstance(more, bool) or not isinstance(more, int) or more < 0:
        raise SummaryError("more: not a count")
    if not isinstance(links, list) or len(links) > MAX_LINKS:
        raise SummaryError(f"links: not a list of at most {MAX_LINKS}")
    out = [parse_link(x) for x in links]
    if len({x.peer for x in out}) != len(out):
        raise SummaryError("links: a peer repeats")
    return seq, out, more


def parse_lease(payload: Any) -> float:
    lease = payload.get("lease") if isinstance(payload, dict) else None
    if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not 0 <= lease <= MAX_LEASE:
        raise SummaryError(f"lease: not 0-{MAX_LEASE:.0f} s")
    return float(lease)


class Rates:
    """Bytes/s per peer from the link's byte counters between two calls."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int, int]] = {}

    def update(self, peer: str, now: float, tx: int, rx: int) -> tuple[float, float]:
        prev = self._last.get(peer)
        self._last[peer] = (now, tx, rx)
        if prev is None or now <= prev[0] or tx < prev[1] or rx < prev[2]:
            return 0.0, 0.0
        dt = now - prev[0]
        return round((tx - prev[1]) * 8 / dt, 1), round((rx - prev[2]) * 8 / dt, 1)   # bit/s

    def retain(self, peers: Iterable[str]) -> None:
        keep = set(peers)
        for p in list(self._last):
            if p not in keep:
                del self._last[p]


def summarize(peers: list[dict], rates: Rates, now: float) -> list[LinkSummary]:
    """This node's links (status's peer dicts, fresh counters) as summaries, the busiest first."""
    out = []
    for p in peers:
        tx, rx = rates.update(p["node_id"], now, int(p.get("tx_bytes") or 0), int(p.get("rx_bytes") or 0))
        drops = {str(k)[:32]: int(v) for k, v in sorted((p.get("drops") or {}).items(), key=lambda kv: -kv[1])
                 if isinstance(v, int) and v > 0}
        hs = p.get("last_handshake_s")
        out.append(LinkSummary(
            p["node_id"], "up" if p.get("state") == "up" else "connecting",
            p.get("path") if p.get("path") in PATHS else None,
            round(float(p["rtt_ms"]), 2) if p.get("rtt_ms") is not None else None, tx, rx,
            (p.get("role") or None) and str(p["role"])[:16], p.get("uptime_s"),
            (p.get("candidates") or None) and str(p["candidates"])[:40],
            round(float(hs), 1) if hs is not None else None, dict(list(drops.items())[:MAX_DROPS])))
    rates.retain(p["node_id"] for p in peers)
    out.sort(key=lambda s: (-(s.tx_bps + s.rx_bps), s.peer))
    return out


def summary_payload(seq: int, links: list[LinkSummary]) -> dict:
    """A ``link_summary`` body within MAX_LINKS and MAX_BYTES (the busiest links kept)."""
    keep = links[:MAX_LINKS]
    while True:
        body = {"v": VERSION, "seq": seq, "links": [x.to_dict() for x in keep], "more": len(links) - len(keep)}
        if body_size(body) <= MAX_BYTES or not keep:
            return body
        keep = keep[:-max(1, len(keep) // 8)]


@dataclass
class Received:
    at: float
    seq: int
    links: list[LinkSummary]
    more: int


@dataclass
class SummaryHooks:
    """What the summaries need from their overlay."""

    members: Callable[[], Iterable[str]]                 # verified members (not me)
    send: Callable[[str, str, dict], Awaitable[None]]    # a signed message to a member
    links: Callable[[], Awaitable[list[dict]]]           # this node's links, fresh counters (status's peers)


class LinkSummaries:
    """Both roles of one overlay at this node: the source (summaries to subscribers) and the
    viewer (subscriptions while the page is open, the summaries received)."""

    def __init__(self, me: str, hooks: SummaryHooks, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.me = me
        self.hooks = hooks
        self.clock = clock
        self.subscribers: dict[str, float] = {}      # viewer -> lease end
        self.received: dict[str, Received] = {}      # member -> its last summary
        self.subscribed: dict[str, float] = {}       # member -> when we last asked it
        self.watch_until = 0.0
        self.drops: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.rates = Rates()
        self.own: list[LinkSummary] = []             # our own links, as last summarized
        self._seq = 0
        self._source: asyncio.Task | None = None
        self._viewer: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def stop(self) -> None:
        await cancel_and_wait(self._source, self._viewer)

    async def _send(self, peer: str, type_: str, payload: dict) -> None:
        try:
            await self.hooks.send(peer, type_, payload)
            self.sent[type_] += 1
        except Exception as e:           # a member gone meanwhile: the next round asks again
            log.debug("event=summary_send_failed peer=%s type=%s error=%s", peer, type_, e)

    # -- messages -----------------------------------------------------------------------------
    async def on_message(self, peer: str, type_: str, payload: Any) -> None:
        """A summary message from a verified member (signed by ``peer``)."""
        if peer not in set(self.hooks.members()):
            self.drops["not_member"] += 1
            return
        try:
            if type_ == SUBSCRIBE:
                self._subscribe(peer, parse_lease(payload))
            elif type_ == SUMMARY:
                self._summary(peer, *parse_summary(payload))
        except SummaryError as e:
            self.drops["malformed"] += 1
            log.info("event=summary_dropped peer=%s type=%s reason=%s", peer, type_, e)

    def _subscribe(self, peer: str, lease: float) -> None:
        now = self.clock()
        self._expire(now)
        if lease == 0:
            self.subscribers.pop(peer, None)
            return
        if peer not in self.subscribers and len(self.subscribers) >= MAX_SUBSCRIBERS:
            self.drops["too_many_subscribers"] += 1
            return
        self.subscribers[peer] = now + lease
        if self._source is None or self._source.done():
            self._source = asyncio.create_task(self._serve(), name="summaries-source")

    def _summary(self, peer: str, seq: int, links: list[LinkSummary], more: int) -> None:
        now = self.clock()
        if now > self.watch_until + LEASE:      # nobody here asked (or long ago): not kept
            self.drops["unsolicited"] += 1
            return
        self.received[peer] = Received(now, seq, links, more)

    def _expire(self, now: float) -> None:
        members = set(self.hooks.members())
        for p, end in list(self.subscribers.items()):
            if end <= now or p not in members:
                del self.subscribers[p]

    # -- the source: summaries to subscribers ---------------------------------------------------
    async def summarize(self) -> list[LinkSummary]:
        self.own = summarize(await self.hooks.links(), self.rates, self.clock())
        return self.own

    async def _serve(self) -> None:
        """Every INTERVAL s while a lease runs: one summary, to each subscriber; then ends."""
        while True:
            self._expire(self.clock())
            if not self.subscribers:
                return
            try:
                links = await self.summarize()
                self._seq += 1
                body = summary_payload(self._seq, links)
                for peer in list(self.subscribers):
                    await self._send(peer, SUMMARY, body)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=summary_failed")
            await asyncio.sleep(INTERVAL)

    # -- the viewer: subscriptions while a page is open --------------------------------------------
    def watch(self) -> None:
        """The page asked (it is open): keep every member sending for a while."""
        self.watch_until = self.clock() + WATCH_IDLE
        if self._viewer is None or self._viewer.done():
            self._viewer = asyncio.create_task(self._view(), name="summaries-viewer")

    @property
    def watching(self) -> bool:
        return self.clock() < self.watch_until

    async def _view(self) -> None:
        """Subscribe to every member (new ones at once), renew every RENEW s, and refresh our own
        links' rates; when the page is gone, cancel the subscriptions and end."""
        while self.watching:
            now = self.clock()
            members = set(self.hooks.members())
            for m in self.targets(members):
                if now - self.subscribed.get(m, -math.inf) >= RENEW:
                    self.subscribed[m] = now
                    await self._send(m, SUBSCRIBE, {"lease": LEASE})
            for gone in set(self.subscribed) - set(self.targets(members)):
                if gone in members:
                    await self._send(gone, SUBSCRIBE, {"lease": 0})
                del self.subscribed[gone]
            for gone in set(self.received) - members:
                del self.received[gone]
            try:
                await self.summarize()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("event=summary_own_failed error=%s", e)
            await asyncio.sleep(1.0)
        for m in list(self.subscribed):
            await self._send(m, SUBSCRIBE, {"lease": 0})
        self.subscribed.clear()
        self.received.clear()        # a page opened later starts fresh, not with every node stale

    def targets(self, members: set[str]) -> list[str]:
        """Whom the viewer asks: every member up to MAX_VIEW, else its neighbours first, then
        the rest in node-id order (in a large overlay a page costs at most MAX_VIEW / INTERVAL
        messages a second; the links of the others are drawn from the LSAs)."""
        if len(members) <= MAX_VIEW:
            return sorted(members)
        near = {x.peer for x in self.own} & members
        return (sorted(near) + sorted(members - near))[:MAX_VIEW]

    def view(self) -> dict:
        """What the viewer knows now: every member's last summary and its age (plain data)."""
        now = self.clock()
        members = set(self.hooks.members())
        return {
            "own": [x.to_dict() for x in self.own],
            "summaries": {o: {"age_s": round(now - r.at, 1), "seq": r.seq, "more": r.more,
                              "links": [x.to_dict() for x in r.links]}
                          for o, r in self.received.items() if o in members},
            "asked": {m: round(now - t, 1) for m, t in self.subscribed.items() if m in members},
        }

    def status(self) -> dict:
        return {"subscribers": len(self.subscribers), "watching": self.watching, "received": len(self.received),
                "sent": dict(self.sent), "drops": dict(self.drops)}


def for_overlay(ov) -> LinkSummaries:
    """The summaries of a running overlay (agent/overlay.py calls this once its signaling is up)."""
    async def links() -> list[dict]:
        await ov.node.refresh_link_stats()
        return ov.snapshot()["peers"]
    return LinkSummaries(ov.node_id, SummaryHooks(members=lambda: ov.signaling.peers().keys(),
                                                  send=ov.signaling.send, links=links))


def overlay_view(ov) -> dict:
    """Everything the web page of one overlay is drawn from, as plain data (``web/model.py``
    builds the graph): this node and the members (names, addresses, guests from their signed
    announces), our links in detail, the members' summaries, the LSA graph."""
    import ipaddress

    from ..naming.names import dns_label, member_from_caps
    snap = ov.snapshot()
    cfg = ov.cfg
    own_guests = [{"name": g.get("name"), "addresses": list(g.get("addresses") or [])}
                  for g in snap.get("guests") or [] if isinstance(g, dict)]
    me = {"node_id": ov.node_id, "name": cfg.dns.name or dns_label(ov.me.own.common_name) or ov.node_id[:8],
          "addresses": [str(ipaddress.ip_interface(a).ip) for a in (cfg.address, cfg.address6) if a],
          "guests": own_guests}
    members = []
    for nid, rec in (ov.signaling.peer_records().items() if ov.signaling else ()):
        m = member_from_caps(nid, rec.peer.common_name, rec.caps)
        members.append({"node_id": nid, "name": m.name or nid[:8], "addresses": [*m.a, *m.aaaa],
                        "guests": [{"name": g, "addresses": list(a)} for g, a in m.guests]})
    edges = []
    if ov.topology is not None:
        db = ov.topology.db
        for o in db.origins():
            lsa = db.get(o)
            edges += [(o, n) for n in (lsa.neighbours if lsa else ())]
    summaries = ov.summaries.view() if getattr(ov, "summaries", None) else {"own": [], "summaries": {}, "asked": {}}
    return {"overlay": cfg.name, "me": me, "members": members, "peers": snap["peers"], "lsa_edges": edges,
            "topology": {k: (snap.get("topology") or {}).get(k) for k in ("mode", "members", "max_hops")},
            **summaries}


class WebSource:
    """The web server's view of this node (``web/server.py``'s ViewSource): its group overlays."""

    CACHE = 0.5     # s a built graph serves every open page (one build per tick, not one per page)

    def __init__(self, node) -> None:
        self.node = node
        self._cache: dict[str, tuple[float, dict]] = {}

    def _ov(self, name: str):
        return next(o for o in self.node.overlays if o.cfg.name == name and o.summaries is not None)

    def overlays(self) -> list[str]:
        return [o.cfg.name for o in self.node.overlays if o.summaries is not None]

    def graph(self, overlay: str) -> dict:
        from ..web.model import build_graph
        now = time.monotonic()
        hit = self._cache.get(overlay)
        if hit is None or now - hit[0] > self.CACHE:
            hit = self._cache[overlay] = (now, build_graph(overlay_view(self._ov(overlay))))
        return hit[1]

    def watch(self, overlay: str) -> None:
        self._ov(overlay).summaries.watch()
