"""The topology policy: which links one node wants, and what to do about them now.

Up to ``all_to_all_max`` members every node links to every other. Above it, a Symphony
overlay on the node-id ring: links to the next ``successors`` members clockwise (the
predecessor links are the same links seen from the other end), about log2 N long links
per node drawn from the harmonic distribution (each node opens half of them; the other
half are other nodes' long links to it), and on-demand links to peers it exchanges much
traffic with but is not linked to.

A link is undirected and lives while **either** end wants it. The end that asks sends a
request with its role; the other end accepts (``accept_incoming``) or refuses politely at
its degree cap, and the requester draws another long-link target. An end that stops
wanting a link *releases* it (the other end keeps it if it wants it, ``released``) or,
when the other end never wanted it, closes it. Churn is bounded: links are released only
when what replaces them is up (successors make-before-break) or when they are idle and
older than ``min_link_age``; on-demand links have a low-water mark (threshold / 4) and an
idle timeout; a node creates at most ``max_new_links_per_min`` links a minute; long links
are kept while their target is a member (re-drawn only when one is missing).

Everything is driven by calls with the time passed in (no clock, no I/O), so the agent,
the simulator and the tests run the same code. The agent's part:

    policy = TopologyPolicy(my_id, TopologyParams(...))
    d = policy.decide(now, members, degrees)  # every ``params.cycle`` s, on member changes and
                                           # after a refusal; degrees: neighbour counts of the LSAs
    for peer, role in d.open: send a link request (role) to peer; start the link if none
    for peer in d.release: tell peer we no longer need the link (it may keep it)
    for peer in d.close: tear the link down
    policy.accept_incoming(peer, role, now) -> bool   # a peer's request (False: refuse)
    policy.released(peer, now) -> bool     # the peer released; True: close it now
    policy.refused(peer, now); policy.link_up(peer, now); policy.link_down(peer, now, failed)
    policy.traffic(peer, nbytes, now)      # bytes with any peer (linked or reached in hops)
    policy.roles()                         # peer -> role, for status
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .ondemand import OnDemand
from .ring import Ring, position
from .symphony import draw_targets

ALL_TO_ALL, SUCCESSOR, PREDECESSOR, LONG, ON_DEMAND = "all-to-all", "successor", "predecessor", "long", "on-demand"
INCOMING = "incoming"  # a link that came up without a request we saw (kept while the peer holds it)
ROLES = (ALL_TO_ALL, SUCCESSOR, PREDECESSOR, LONG, ON_DEMAND)
_RING_ROLES = (ALL_TO_ALL, SUCCESSOR)  # requests accepted up to max_degree (the rest keep a reserve)
NEVER = -math.inf


@dataclass(frozen=True)
class TopologyParams:
    """The knobs, with their defaults (docs/topology.md says why each)."""

    all_to_all_max: int = 8            # at or below this many members (me included): all-to-all
    successors: int = 2                # ring links opened clockwise
    long_links: int | None = None      # long links per node, both directions; None: floor(log2 N)
    max_degree: int = 24               # links per node, never exceeded
    ondemand_slots: int = 4            # of those, kept free of long links for on-demand ones
    ondemand_threshold_bps: float = 1e6  # create an on-demand link above this rate; 0: off
    ondemand_window: float = 10.0      # s over which rates are measured; also "carrying traffic"
    ondemand_idle: float = 60.0        # remove an on-demand link after this long below threshold/4
    max_new_links_per_min: int = 10    # links this node creates per sliding minute
    min_link_age: float = 30.0         # an idle link not replaced is released only this old
    request_timeout: float = 30.0      # a requested link not up by then is given up
    retry_backoff: float = 60.0        # a peer that refused or failed: not asked again for this (x2 per failure, up to x8)
    cycle: float = 10.0                # how often decide() runs (the simulator's round)
    seed: int = 0                      # long-link draws are deterministic per (seed, node id)

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"topology: {msg}")
        need(self.all_to_all_max >= 1, f"all_to_all_max must be >= 1 (got {self.all_to_all_max})")
        need(self.successors >= 1, f"successors must be >= 1 (got {self.successors})")
        need(self.long_links is None or self.long_links >= 0, f"long_links must be >= 0 or None (got {self.long_links})")
        need(self.max_degree >= self.all_to_all_max - 1,
             f"max_degree ({self.max_degree}) must be >= all_to_all_max - 1 ({self.all_to_all_max - 1})")
        need(self.max_degree > 2 * self.successors,
             f"max_degree ({self.max_degree}) must be > 2 * successors ({2 * self.successors}): ring links first")
        need(self.ondemand_slots >= 0, f"ondemand_slots must be >= 0 (got {self.ondemand_slots})")
        need(self.max_degree > 2 * self.successors + self.ondemand_slots,
             f"max_degree ({self.max_degree}) must be > 2 * successors + ondemand_slots "
             f"({2 * self.successors + self.ondemand_slots})")
        need(self.ondemand_threshold_bps >= 0, "ondemand_threshold_bps must be >= 0 (0: off)")
        for name in ("ondemand_window", "ondemand_idle", "request_timeout", "cycle"):
            need(getattr(self, name) > 0, f"{name} must be > 0 s (got {getattr(self, name)})")
        for name in ("min_link_age", "retry_backoff"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0 s (got {getattr(self, name)})")
        need(self.max_new_links_per_min >= 1, f"max_new_links_per_min must be >= 1 (got {self.max_new_links_per_min})")

    def long_total(self, n: int) -> int:
        """Long links per node (opened + accepted) for n members."""
        if self.long_links is not None:
            return self.long_links
        return int(math.floor(math.log2(n))) if n >= 2 else 0

    def long_opened(self, n: int) -> int:
        """Long links one node opens: half the total (the other half are others' links to it)."""
        total = self.long_total(n)
        return max(1, total // 2) if total > 0 else 0

    def structured(self, n: int) -> bool:
        return n > self.all_to_all_max

    def cap(self, role: str, n: int) -> int:
        """Links a node may have when it opens or accepts a link of ``role`` among n members:
        ring links up to max_degree; on-demand ones leave room for the ring (2 * successors);
        long ones also leave ``ondemand_slots`` (when on-demand is on)."""
        if role in _RING_ROLES or not self.structured(n):
            return self.max_degree
        cap = self.max_degree - 2 * self.successors
        if role != ON_DEMAND and self.ondemand_threshold_bps > 0:
            cap -= self.ondemand_slots
        return cap


@dataclass
class _Link:
    mine: str | None           # my role when I want this link
    theirs: str | None         # the role the peer asked for when it wants it
    up: bool
    since: float               # requested (while pending), came up (once up)
    last_traffic: float = NEVER


@dataclass(frozen=True)
class Decision:
    """What one ``decide`` call asks the caller to do (and what it keeps)."""

    open: tuple[tuple[str, str], ...] = ()   # (peer, role): send a request; start the link if none yet
    release: tuple[str, ...] = ()            # tell the peer we no longer need the link
    close: tuple[str, ...] = ()              # tear the link down (or abandon the request)
    held: tuple[str, ...] = ()               # no longer needed, kept: busy or too young
    waiting: bool = False                    # a wanted link waits for the rate limit or a back-off
    roles: dict[str, str] = field(default_factory=dict)  # every link kept or requested -> role
    timed_out: tuple[str, ...] = ()          # of ``close``: wanted links not up within request_timeout
                                             # (no path: the peer is backed off, the agent tells it so)

    @property
    def changed(self) -> bool:
        return bool(self.open or self.release or self.close)

    @property
    def settled(self) -> bool:
        """Nothing to do now and nothing due later (but traffic and member changes)."""
        return not (self.changed or self.held or self.waiting)


class TopologyPolicy:
    """One node's policy state: its links with roles, rate limit, back-off and traffic."""

    def __init__(self, me: str, params: TopologyParams | None = None):
        position(me)  # validates the id
        self.me = me
        self.params = params or TopologyParams()
        self.ondemand = OnDemand(self.params.ondemand_window)
        self._links: dict[str, _Link] = {}
        self._opened: deque[float] = deque()          # times of links created (rate limit)
        self._backoff: dict[str, tuple[float, int]] = {}  # peer -> (until, failures)
        self._od_busy: dict[str, float] = {}          # peer -> last time its rate was >= threshold/4
        self._ring: Ring | None = None
        self._ring_key: frozenset[str] | None = None
        self._n = 1
        self._rng = random.Random(f"{self.params.seed}/{me}")
        self.refusals = 0                             # incoming requests refused (degree cap)

    # -- views -----------------------------------------------------------------------
    @property
    def degree(self) -> int:
        """Links up or requested (both count against max_degree)."""
        return len(self._links)

    def up_links(self) -> set[str]:
        return {p for p, l in self._links.items() if l.up}

    def roles(self) -> dict[str, str]:
        """peer -> role as this node sees the link (for status)."""
        return {p: self._role(l) for p, l in self._links.items()}

    @staticmethod
    def _role(l: _Link) -> str:
        if l.mine is not None:
            return l.mine
        return PREDECESSOR if l.theirs == SUCCESSOR else (l.theirs or INCOMING)

    # -- events from the caller ------------------------------------------------------
    def accept_incoming(self, peer: str, role: str, now: float) -> bool:
        """A peer asks for a link (or says it wants an existing one). False: refused, at the cap.

        Ring requests (successor, all-to-all) are accepted up to ``max_degree``, on-demand
        ones up to ``max_degree - 2 * successors`` (ring links always fit), long ones up to
        that minus ``ondemand_slots`` (on-demand links fit too). See ``TopologyParams.cap``.
        """
        l = self._links.get(peer)
        if l is not None:
            l.theirs = role
            return True
        if peer == self.me:
            return False
        if len(self._links) >= self.params.cap(role, max(self._n, self.params.all_to_all_max + 1)):
            self.refusals += 1
            return False
        self._links[peer] = _Link(mine=None, theirs=role, up=False, since=now)
        return True

    def released(self, peer: str, now: float) -> bool:
        """The peer no longer needs the link. True: nobody wants it, close it now."""
        l = self._links.get(peer)
        if l is None:
            return False
        l.theirs = None
        if l.mine is None:
            del self._links[peer]
            return True
        return False

    def refused(self, peer: str, now: float) -> None:
        """Our request was refused: forget it, back off from that peer (long links re-draw)."""
        l = self._links.get(peer)
        ring_link = l is not None and l.mine in _RING_ROLES
        if l is not None and not l.up:
            del self._links[peer]
            if l.since in self._opened:  # nothing was created: it does not count against the rate
                self._opened.remove(l.since)
        # a ring link has no alternative: ask again next cycle (its target is only full
        # while its own ring changes); a long link is re-drawn elsewhere meanwhile
        self._back_off(peer, now, self.params.cycle if ring_link else None)

    def link_up(self, peer: str, now: float) -> None:
        l = self._links.get(peer)
        if l is None:
            l = self._links[peer] = _Link(mine=None, theirs=INCOMING, up=False, since=now)
        if not l.up:
            l.up, l.since = True, now
        self._backoff.pop(peer, None)

    def link_down(self, peer: str, now: float, failed: bool = False) -> None:
        """The link is gone (closed by either end, peer left, or failed: then back off)."""
        l = self._links.pop(peer, None)
        if failed and l is not None and l.mine is not None:
            self._back_off(peer, now)

    def traffic(self, peer: str, nbytes: int, now: float) -> None:
        """Bytes exchanged with a peer, linked or reached over other nodes."""
        self.ondemand.observe(peer, nbytes, now)
        l = self._links.get(peer)
        if l is not None and nbytes > 0:
            l.last_traffic = now

    def _back_off(self, peer: str, now: float, base: float | None = None) -> None:
        _, fails = self._backoff.get(peer, (0.0, 0))
        fails += 1
        base = self.params.retry_backoff if base is None else base
        self._backoff[peer] = (now + base * min(2 ** (fails - 1), 8), fails)

    def _backed_off(self, peer: str, now: float) -> bool:
        b = self._backoff.get(peer)
        return b is not None and now < b[0]

    def backoff(self, peer: str, now: float) -> tuple[float, int] | None:
        """(seconds until this node asks ``peer`` again, failures in a row), or None when it
        is not backed off from it (status shows when a failed pair is tried again)."""
        b = self._backoff.get(peer)
        if b is None or now >= b[0]:
            return None
        return b[0] - now, b[1]

    # -- the decision ----------------------------------------------------------------
    def _ring_of(self, members: Ring | Iterable[str]) -> Ring:
        if isinstance(members, Ring) and self.me in members:
            self._ring, self._ring_key = members, None
            return members
        key = frozenset(members) | {self.me}
        if self._ring is None or key != self._ring_key:
            self._ring, self._ring_key = Ring(key), key
        return self._ring

    def decide(self, now: float, members: Ring | Iterable[str],
               degrees: Mapping[str, int] | None = None) -> Decision:
        """The links this node wants among ``members`` (me may be in it or not), and the
        actions that move its links towards them, within the churn limits.

        ``degrees`` (optional): members' link counts as their LSAs say; long-link draws
        skip members already at the cap for long links, which would refuse anyway."""
        p = self.params
        ring = self._ring_of(members)
        n = self._n = len(ring)
        links = self._links
        opens: list[tuple[str, str]] = []
        release: list[str] = []
        close: list[str] = []
        held: list[str] = []
        timed_out: list[str] = []

        # gone members and requests that never came up
        for peer in list(links):
            l = links[peer]
            if peer not in ring or (not l.up and now - l.since > p.request_timeout):
                if l.mine is not None and peer in ring:
                    self._back_off(peer, now)
                    timed_out.append(peer)
                del links[peer]
                close.append(peer)
        for peer in [q for q in self._backoff if q not in ring or now >= self._backoff[q][0] + 8 * p.retry_backoff]:
            del self._backoff[peer]

        # traffic: rates over the window, with the low-water mark of on-demand links
        thr = p.ondemand_threshold_bps
        rates = self.ondemand.rates(now) if thr > 0 else {}
        for peer, r in rates.items():
            if r >= thr / 4:
                self._od_busy[peer] = now
        for peer in [q for q in self._od_busy if q not in ring or now - self._od_busy[q] > p.ondemand_idle]:
            del self._od_busy[peer]

        # what I want: peer -> role, in priority order (ring first)
        wanted: dict[str, str] = {}
        draws = 0
        if not p.structured(n):
            for peer in ring:
                if peer != self.me:
                    wanted[peer] = ALL_TO_ALL
        else:
            for peer in ring.successors(self.me, p.successors):
                wanted[peer] = SUCCESSOR
            target = p.long_opened(n)
            kept = [q for q, l in links.items() if l.mine == LONG and q not in wanted]
            kept.sort(key=lambda q: (now - links[q].last_traffic > p.ondemand_window, links[q].since, q))
            for q in kept[:target]:
                wanted[q] = LONG
            draws = target - min(len(kept), target)
            if thr > 0:
                for q, l in links.items():  # linked peers with traffic: on-demand keeps them
                    if q in wanted:
                        continue
                    if (l.mine == ON_DEMAND and q in self._od_busy) or (l.up and rates.get(q, 0.0) >= thr):
                        wanted[q] = ON_DEMAND

        # existing links against the wants (releases wait until the new links are up)
        for q, l in links.items():
            role = wanted.get(q)
            if role is not None and l.mine != role:
                # a claim on an existing link (or a new role for it): the peer must know we
                # need it, and as what (its status shows the role; all-to-all links of a
                # growing overlay become ring or long links this way)
                opens.append((q, role))
                l.mine = role

        # new links: ring first, then long draws, then on-demand; rate limit and degree cap
        while self._opened and now - self._opened[0] >= 60.0:
            self._opened.popleft()
        ring_cap, long_cap = p.max_degree, p.cap(LONG, n)

        def can_open(role: str) -> bool:
            return len(links) < p.cap(role, n) and len(self._opened) < p.max_new_links_per_min

        def do_open(q: str, role: str) -> None:
            links[q] = _Link(mine=role, theirs=None, up=False, since=now)
            self._opened.append(now)
            opens.append((q, role))
            if role == ON_DEMAND:
                self._od_busy[q] = now

        waiting = False
        for q, role in list(wanted.items()):
            if q not in links:
                if not self._backed_off(q, now) and can_open(role):
                    do_open(q, role)
                else:
                    waiting = waiting or self._backed_off(q, now) or len(self._opened) >= p.max_new_links_per_min
        if draws > 0 and len(self._opened) >= p.max_new_links_per_min:
            waiting = True
        if draws > 0 and can_open(LONG):
            room = min(draws, long_cap - len(links), p.max_new_links_per_min - len(self._opened))
            exclude = set(links) | set(wanted) | {q for q in self._backoff if self._backed_off(q, now)}
            fits = (lambda q: degrees.get(q, 0) < long_cap) if degrees else None
            load = (lambda q: degrees.get(q, 0)) if degrees else None
            for q in draw_targets(self.me, ring, room, self._rng, exclude=exclude, acceptable=fits, load=load):
                wanted[q] = LONG
                do_open(q, LONG)
        if thr > 0:
            for q, r in sorted(rates.items(), key=lambda kv: -kv[1]):
                if r < thr or q in links or q not in ring or q == self.me or self._backed_off(q, now):
                    continue
                if not can_open(ON_DEMAND):
                    waiting = waiting or len(self._opened) >= p.max_new_links_per_min
                    break
                wanted[q] = ON_DEMAND
                do_open(q, ON_DEMAND)

        # links no longer wanted: a request not yet up is dropped at once; a ring link
        # (successor, all-to-all) only once everything wanted is up (make-before-break);
        # an on-demand link once idle (its low-water mark); any other when everything
        # wanted is up, or when it is idle and older than min_link_age
        replaced = all(q in links and links[q].up for q in wanted)
        # at the cap with a ring link still to open: break before make (held links go now,
        # or, with none, the newest link only the peer wanted: it re-draws elsewhere)
        cramped = len(links) >= ring_cap and any(
            r in _RING_ROLES and q not in links and not self._backed_off(q, now) for q, r in wanted.items())
        if cramped and not any(l.mine is not None and q not in wanted for q, l in links.items()):
            spare = [q for q, l in links.items() if l.mine is None and l.theirs not in _RING_ROLES]
            if spare:
                q = max(spare, key=lambda x: (links[x].since, x))
                del links[q]
                close.append(q)
        for q, l in list(links.items()):
            if q in wanted or l.mine is None:
                if l.mine is None and l.theirs is None:
                    del links[q]
                    close.append(q)
                continue
            idle = now - l.last_traffic > p.ondemand_window
            if (not l.up or replaced or cramped or l.mine == ON_DEMAND
                    or (l.mine not in _RING_ROLES and idle and now - l.since >= p.min_link_age)):
                l.mine = None
                if l.theirs is None:
                    del links[q]
                    close.append(q)
                else:
                    release.append(q)
            else:
                held.append(q)

        return Decision(open=tuple(opens), release=tuple(release), close=tuple(close),
                        held=tuple(held), waiting=waiting, roles=self.roles(), timed_out=tuple(timed_out))
