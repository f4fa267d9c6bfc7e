"""One SocialVPN overlay's logic in the agent (docs/social.md): joins the roster-driven
signaling (signaling/social.py), the friend state (social/: pins, address book, friend list)
and the switch app's translation (ryu_apps/social_nat.py) to ``agent/overlay.py``.

Members are friends' nodes whose key is the pinned one; every member gets a direct link
(all-to-all among friends: no link requests, no link-state adverts -- a friend must not learn
who our other friends are, and the switch app needs no graph: each friend is one port). A
node's link goes as soon as it stops being wanted: its friend was removed, or its key is
refused. The overlay calls ``SocialTopology`` where a group overlay calls ``OverlayTopology``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from typing import Any

from ..aio import cancel_and_wait
from ..bridge.overlay_bridge import stable_mac
from ..errors import IpopError
from ..identity.selfsigned import social_dir, social_identity
from ..identity.store import NodeIdentity, OverlayIdentity
from ..social.addressbook import AddressBook
from ..social.friends import FriendList, NodeState
from ..social.ids import BadName, bare_jid, friend_label, node_name
from ..social.pins import PinStore, show_fp
from ..social.store import SocialStateError

log = logging.getLogger("ipop_switch.agent.social")

CYCLE = 5.0          # s between two looks at the links (and after every change)
LEAVE_GRACE = 2.0    # a friend's node gone from XMPP: its link goes after this (a roster removal: at once)


def default_node_name() -> str:
    """The host name as one DNS label (what a friend's hosts file calls this node)."""
    label = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")[:63].strip("-")
    return label or "node"


@dataclass
class _Params:
    ondemand_threshold_bps: float = 0.0   # never on-demand: every friend's node is linked


class _Policy:
    @staticmethod
    def roles() -> dict[str, str]:
        return {}


class SocialPart:
    """The social state of one overlay and its hooks for ``Overlay``."""

    def __init__(self, ov: Any) -> None:   # agent/overlay.py's Overlay (not imported: it imports us)
        self.ov = ov
        self.cfg = ov.cfg
        self.name = node_name(self.cfg.social.node or default_node_name())
        self.own_jid = bare_jid(self.cfg.xmpp.jid)
        iface = ipaddress.ip_interface(self.cfg.address)
        self.own_ip, self.network = str(iface.ip), str(iface.network)
        self.roster = None
        self.topology: SocialTopology | None = None
        self.refused_logged: set[tuple[str, str, str]] = set()
        self.refused: set[tuple[str, str]] = set()   # (node id, fingerprint) judged refused: not re-counted

    # -- hooks for Overlay.start ----------------------------------------------------------
    def identity(self, ident: NodeIdentity) -> OverlayIdentity:
        """Our self-signed identity and the friend state kept next to it (identity dir: it must
        survive reboots, like the keys)."""
        d = social_dir(ident, self.cfg.name)
        try:
            self.pins = PinStore.load(d / "pins.json")
            self.book = AddressBook.load(d / "addresses.json", network=self.network, own=self.own_ip,
                                         overrides=self.cfg.social.addresses)
        except SocialStateError as e:
            raise IpopError(f"overlay {self.cfg.name}: {e}") from None
        self.friends = FriendList(self.pins)
        self.friends.roster(self.own_jid, "both")   # our own other devices
        return social_identity(ident, self.cfg.name, self.name)

    async def switch_ready(self) -> None:
        await self.ov.switch.set_social(self.own_ip, stable_mac(self.ov.node_id, self.cfg.name))

    def make_signaling(self, me: OverlayIdentity):
        from ..signaling.config import SignalingConfig
        from ..signaling.session import SignalingSession
        from ..signaling.social import SocialDiscovery, SocialRoster
        x = self.cfg.xmpp
        self.roster = SocialRoster(self.own_jid, self.cfg.name, on_change=self._roster_changed)
        scfg = SignalingConfig(jid=x.jid, password=x.secret(), server=x.server, port=x.port, servers=x.servers,
                               ca_file=x.ca_file, resource=self.name, initial_presence=False, leave_grace=LEAVE_GRACE)
        roster = self.roster
        return SignalingSession(me, scfg, discovery=lambda _room, node_id: SocialDiscovery(roster, node_id))

    def make_topology(self) -> "SocialTopology":
        self.topology = SocialTopology(self)
        return self.topology

    # -- state ------------------------------------------------------------------------------
    def _roster_changed(self) -> None:
        r = self.roster
        for bare in list(self.friends.friends):
            if bare != self.own_jid and bare not in r.items:
                self.friends.roster(bare, "remove")
        for bare, it in r.items.items():
            self.friends.roster(bare, it["subscription"], ask=it["ask"])
        self.refused.clear()   # judged again: a friend back (or gone) changes the verdicts
        if self.topology:
            self.topology.poke()

    def _where(self, node_id: str) -> tuple[str, str] | None:
        """(friend, node) a peer logged in as: its full JID."""
        rec = self.ov.signaling.peer_records().get(node_id) if self.ov.signaling else None
        if rec is None or not rec.address:
            n = self.friends.by_node_id(node_id)
            return (n.jid, n.node) if n else None
        try:
            bare, _, res = rec.address.partition("/")
            return bare_jid(bare), node_name(res)
        except BadName:
            return None

    def check(self, node_id: str) -> bool:
        """A verified peer: is it a friend's node with the pinned key? (Pins it on first sight;
        a changed key is refused loudly: logged once per key, counted, shown.)"""
        where = self._where(node_id)
        peer = self.ov.signaling.peer(node_id) if self.ov.signaling else None
        if where is None or peer is None:
            return False
        jid, node = where
        n = self.friends.nodes.get((jid, node))
        if n is not None and n.node_id == node_id and n.state is not NodeState.REFUSED:
            return True                                   # judged before, trusted
        if (node_id, peer.fingerprint) in self.refused:
            return False                                  # judged before, refused: counted once
        state = self.friends.node_seen(jid, node, node_id, peer.fingerprint)
        if state is NodeState.REFUSED:
            self.refused.add((node_id, peer.fingerprint))
            pin = self.pins.pins.get((jid, node))
            key = (jid, node, peer.fingerprint)
            if pin is not None and key not in self.refused_logged:
                self.refused_logged.add(key)
                log.warning("event=friend_key_refused overlay=%s friend=%s node=%s pinned=%s offered=%s "
                            "hint=\"compare out of band, then 'ipop-switch friends forget %s %s'\"",
                            self.cfg.name, jid, node, show_fp(pin.fingerprint), peer.fingerprint, jid, node)
            return False
        n = self.friends.nodes.get((jid, node))
        return n is not None and n.node_id == node_id

    def wanted(self) -> set[str]:
        peers = set(self.ov.signaling.peers()) if self.ov.signaling else set()
        return {nid for nid in peers if self.check(nid)}

    def address_of(self, node_id: str) -> str:
        where = self._where(node_id)
        if where is None:
            raise IpopError(f"no friend's node {node_id}")
        return str(self.book.address_of(*where))

    def link_state(self, node_id: str, up: bool) -> None:
        where = self._where(node_id)
        if where:
            self.friends.link(*where, up)

    # -- names (friends hosts, the DNS responder) ---------------------------------------------
    def known_nodes(self) -> list[tuple[str, str]]:
        """(friend, node) of every friend node seen or pinned: the nodes that have a name."""
        nodes = {(n.jid, n.node) for n in self.friends.nodes.values()} | set(self.pins.pins)
        return sorted(nodes)

    def names(self) -> list[tuple[str, str]]:
        """(host name, address) in this node's view: this node first, then what ``friends hosts``
        prints (the same book, the same suffix), for the overlay's DNS responder."""
        suffix = self.cfg.social.suffix
        out = [(f"{self.name}.{friend_label(self.own_jid)}.{suffix}", self.own_ip)]
        for line in self.book.hosts(suffix, self.known_nodes()):
            addr, name = line.split("\t", 1)
            out.append((name, addr))
        return out

    # -- commands (ipop-switch friends ...) -----------------------------------------------------
    async def command(self, cmd: dict) -> dict:
        op = cmd.get("op")
        try:
            if op == "list":
                return {"ok": True, **self.snapshot()}
            if op == "hosts":
                return {"ok": True, "lines": self.book.hosts(self.cfg.social.suffix, self.known_nodes())}
            jid = str(cmd.get("jid") or "")
            if op in ("add", "accept", "remove"):
                if self.roster is None:
                    raise IpopError("signaling is not started")
                text = getattr(self.roster, op)(jid)
                if op == "remove":
                    self.friends.roster(bare_jid(jid), "remove")
                    if self.topology:
                        await self.topology.reconcile()
                return {"ok": True, "text": text}
            if op == "verify":
                nodes = self.pins.verify(jid, str(cmd.get("fingerprint") or ""))
                return {"ok": True, "text": f"verified {bare_jid(jid)}: {', '.join(nodes)}"}
            if op == "forget":
                node = str(cmd.get("node") or "")
                had = self.friends.forget(jid, node)
                self.refused_logged = {k for k in self.refused_logged if k[:2] != (bare_jid(jid), node_name(node))}
                self.refused.clear()
                if self.topology:
                    await self.topology.reconcile()   # a refused node still known is re-pinned now
                return {"ok": True, "text": f"forgot {bare_jid(jid)}/{node_name(node)}" if had else
                        f"nothing pinned for {bare_jid(jid)}/{node_name(node)}"}
        except (BadName, SocialStateError) as e:
            raise IpopError(str(e)) from None
        raise IpopError(f"friends: unknown operation {op!r} (add, accept, remove, list, verify, forget, hosts)")

    # -- status ---------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        links = self.ov.links
        r = self.roster
        friends: dict[str, dict] = {}
        names = set(self.friends.friends) | (set(r.items) | r.requests if r else set()) | {j for j, _ in self.pins.pins}
        for bare in sorted(names):
            f = self.friends.friends.get(bare)
            it = r.items.get(bare, {}) if r else {}
            nodes = {}
            for (j, node), pin in sorted(self.pins.pins.items()):
                if j != bare:
                    continue
                n = self.friends.nodes.get((j, node))
                link = links.get(n.node_id) if n else None
                refused = self.pins.refused.get((j, node))
                state = n.state.value if n else "offline"
                if refused is not None and (n is None or n.state is NodeState.REFUSED or n.node_id != pin.node_id):
                    state = "refused"
                nodes[node] = {
                    "state": state, "node_id": n.node_id if n else pin.node_id,
                    "fingerprint": show_fp(pin.fingerprint), "verified": pin.verified,
                    "address": str(self.book.address_of(j, node)),
                    "path": link.path if link and link.state == "up" else None,
                    "rtt_ms": link.stats.get("rtt_ms") if link else None,
                    "refused": {"fingerprint": show_fp(refused.fingerprint), "count": refused.count} if refused else None,
                }
            friends[bare] = {"subscription": "self" if bare == self.own_jid else (f.subscription if f else it.get("subscription", "none")),
                             "asked": bool(it.get("ask")), "requested": bool(r and bare in r.requests),
                             "nodes": nodes}
        drops = dict(self.friends.drops)
        if r:
            for k, v in r.drops.items():
                drops[k] = drops.get(k, 0) + v
        me = getattr(self.ov, "me", None)
        return {"jid": self.own_jid, "node": self.name, "address": self.own_ip, "range": self.network,
                "fingerprint": me.own.fingerprint if me else None, "friends": friends, "drops": drops}


class SocialTopology:
    """Links to every wanted friend node; the subset of ``OverlayTopology``'s interface the
    overlay calls. Link messages of the group topology are not spoken here (counted)."""

    def __init__(self, part: SocialPart) -> None:
        self.part = part
        self.params = _Params()
        self.policy = _Policy()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.ignored = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"social-{self.part.cfg.name}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=social_reconcile_failed overlay=%s", self.part.cfg.name)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), CYCLE)
            except asyncio.TimeoutError:
                pass

    async def reconcile(self) -> None:
        ov = self.part.ov
        want = self.part.wanted()
        for nid in sorted(set(ov.links) - want):
            await ov._close_member(nid, "not a trusted friend's node")
        for nid in sorted(want - set(ov.links)):
            await ov._open_member(nid)

    def poke(self) -> None:
        self._wake.set()

    def members(self) -> set[str]:
        return self.part.wanted()

    def knows(self, peer: str) -> bool:
        return peer in self.part.wanted()

    async def on_message(self, peer: str, type_: str, payload: dict) -> None:
        self.ignored += 1   # a group's topology message: not spoken in a social overlay

    async def drop_stale(self, peer: str) -> None:
        return None

    def member_appeared(self, peer: str) -> None:
        self.poke()

    def member_left(self, peer: str) -> None:
        where = self.part._where(peer)
        if where:
            self.part.friends.node_gone(*where)
        self.poke()

    def link_up(self, peer: str) -> None:
        self.part.link_state(peer, True)

    def link_down(self, peer: str) -> None:
        self.part.link_state(peer, False)

    def link_closed(self, peer: str, *, failed: bool = False) -> None:
        self.part.link_state(peer, False)
        self.poke()

    def traffic(self, per_peer: dict[str, int]) -> None:
        return None

    def snapshot(self) -> dict[str, Any]:
        return {"mode": "social", "links": len(self.part.ov.links), "ignored_messages": self.ignored}
