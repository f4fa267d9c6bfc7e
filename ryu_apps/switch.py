"""The overlay's OpenFlow 1.3 switch app (os-ken): L2 learning, ARP/ND suppression,
loop-free exactly-once flooding over per-origin shortest-path trees, TCP MSS clamping.

Pipeline (docs/switch.md explains why):
  table 0  trap & learn: SYNs and ARP/NS requests from local ports -> app; other ARP/ND
           copied to the app; (port, src MAC, root tag) markers skip the learning packet-in.
  table 1  flood ingress: a tagged frame of root R is accepted only on the port to this
           node's parent in R's tree; its root tag is popped into metadata.
  table 2  flood depth check (depth == own distance to R) and replication to the
           children in R's tree (re-tagged, depth + 1) and to the local ports (untagged).
  table 3  L2 forwarding by learned destination; miss, broadcast and multicast: flood
           as origin (tags root=self, depth=1) to own tree children and local ports.

Flood frames carry two 802.1Q tags between nodes: outer VID = root index (1 + rank of
the root's node id in the sorted node list), inner VID = depth (hops from the root).

Hostile input is bounded: the MAC table is capped in total and per port (tables.py; a MAC
over a cap is not learned, its frames flood), flow-removed finds its flow by cookie, and
only the datapath the agent named is adopted (any other switch is closed and counted).

Guests (extra local ports) are guarded in table 0: unless DHCP-trusted, a port's DHCP
server messages and IPv6 router adverts are dropped (one DHCP server per overlay), and a
MAC-locked port may send only from its allowed MACs. These drops are flows (no packet-in),
counted from OVS's flow stats, per port too. A station that turns up at a local port from
elsewhere with a unicast first frame gets an announcement flooded on its behalf, so every
node re-points to it at once (a broadcast first frame teaches them by itself).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from os_ken.base import app_manager
from os_ken.controller import ofp_event
from os_ken.controller.handler import CONFIG_DISPATCHER, MAIN_DISPATCHER, set_ev_cls
from os_ken.ofproto import ofproto_v1_3

from ipop_switch.bridge import switch_channel as ch

from . import flood, packets
from .social_nat import SocialNat
from .tables import FlowRec, FlowTable, MacEntry, MacTable

LOG = logging.getLogger("ryu_apps.switch")

T_TRAP, T_FLOOD_IN, T_FLOOD, T_L2 = 0, 1, 2, 3
# cookie = kind << 48 | serial: the kind tells a packet-in's reason, the serial names the flow.
K_BASE, K_LEARN_MISS, K_SNOOP, K_ARP_REQ, K_NS, K_SYN, K_MARKER, K_POINTER = range(1, 9)
# guard drops share kind bit 4 (no other kind has it): one masked flow-stats request finds them all
K_DHCP, K_RA, K_SPOOF = 16, 17, 18
SOCIAL_KINDS = (9, 10, 11)  # SocialVPN flows (social_nat.py): translated in, dropped in, out to a friend
GUARD_BIT = 16 << 48
GUARD = {K_DHCP: ("dhcp_dropped", "dhcp"), K_RA: ("ra_dropped", "ra"), K_SPOOF: ("spoof_dropped", "spoof")}
OFPP_LOCAL = ofproto_v1_3.OFPP_LOCAL
VID_PRESENT = ofproto_v1_3.OFPVID_PRESENT
MCAST = ("01:00:00:00:00:00", "01:00:00:00:00:00")


@dataclass(frozen=True)
class PortOpts:
    """What the agent said about a local port."""

    dhcp_trusted: bool = False
    allowed_macs: tuple[str, ...] | None = None  # None: any source MAC


@dataclass
class Settings:
    """Set by the launcher before the app starts (os-ken apps take no constructor args)."""

    channel: str = ""
    aging: int = 300  # seconds without a frame from a MAC before it is forgotten
    mtu: int = 0
    max_macs: int = 8192  # learned MACs in total (also the cap on snooped IP -> MAC bindings)
    max_macs_per_port: int = 1024  # learned MACs behind one port
    dpid: int | None = None  # the bridge's datapath id (None: refuse every switch until set_datapath)
    ovs_rundir: str = ""  # ovs-vswitchd's run directory: the datapath flow cache is purged through it


SETTINGS = Settings()


class OverlaySwitch(app_manager.OSKenApp):
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.RLock()
        self.settings = SETTINGS
        self.dp = None
        self.node_id: str | None = None
        self.mtu = SETTINGS.mtu
        self.port_no: dict[str, int] = {}  # OVS port name -> ofport (ports present now)
        self.peer_decl: dict[str, str] = {}  # port name -> peer node id (told by the agent)
        self.local_decl: set[str] = set()
        self.local_opts: dict[str, PortOpts] = {}  # local port name -> its guards
        self.local_name: str | None = None  # the LOCAL port's name (the bridge's)
        self.guard_cookies: dict[int, tuple[int, str]] = {}  # installed guard flow -> (kind, port name)
        self.port_gone: dict[str, Counter] = {}  # port name -> guard drops of its removed flows
        self.topology: list[tuple[str, str]] | None = None
        self.peer_port: dict[str, int] = {}  # peer node -> active ofport
        self.port_peer: dict[int, str] = {}
        self.local_ports: set[int] = {OFPP_LOCAL}
        self.plan: flood.FloodPlan | None = None
        self.macs = MacTable(SETTINGS.max_macs, SETTINGS.max_macs_per_port)
        self.ips: dict[str, tuple[bytes, float]] = {}  # oldest first: evicted past max_macs
        self.flows = FlowTable()
        self.expected_dpid = SETTINGS.dpid  # told by the agent; any other datapath is refused
        self._logged: set[str] = set()  # warnings already logged once
        self.base_keys: set[tuple] = set()
        self.serial = itertools.count(1)
        self.counters = {k: 0 for k in ch.COUNTERS}
        self.waiters: dict[int, tuple[threading.Event, list]] = {}
        self.ready = threading.Event()
        self.purger = _Purger(self)
        self.social = SocialNat()  # friend ports and address translation (SocialVPN); idle otherwise
        self.social_gone = {k: 0 for k in ("social_translated", "social_dropped")}  # removed flows' counts
        if self.settings.channel:
            self._server = _ChannelServer(self.settings.channel, self)
            threading.Thread(target=self._server.serve, name="channel", daemon=True).start()

    # ------------------------------------------------------------------ switch events
    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def _features(self, ev) -> None:
        dp = ev.msg.datapath
        ofp, parser = dp.ofproto, dp.ofproto_parser
        with self.lock:
            if self.expected_dpid is None or ev.msg.datapath_id != self.expected_dpid:
                self._refuse_datapath(dp, ev.msg.datapath_id)
                return
            old, self.dp = self.dp, dp
            if old is not None and old is not dp:
                old.close()  # the bridge reconnected: its old connection is dead or dying
            self.ready.clear()
            self.flows.clear()
            self.guard_cookies.clear()  # that connection's flows are deleted below: start afresh
            self.base_keys.clear()
            self.macs.clear()
            self.port_no.clear()
            dp.send_msg(parser.OFPFlowMod(dp, command=ofp.OFPFC_DELETE, table_id=ofp.OFPTT_ALL,
                                          out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY))
            dp.send_msg(parser.OFPPortDescStatsRequest(dp, 0))
        LOG.info("switch %016x connected", dp.id)

    def _refuse_datapath(self, dp, dpid: int) -> None:
        """Not our bridge (or the agent has not said which one is): close it, count, log once."""
        self.counters["datapaths_refused"] += 1
        self._warn_once("dp", "refused an OpenFlow connection from datapath %016x (expected %s)",
                        dpid, "none yet" if self.expected_dpid is None else f"{self.expected_dpid:016x}")
        dp.close()
        try:
            dp.socket.shutdown(socket.SHUT_RDWR)  # close() only half-closes: end its receive loop too
        except OSError:
            pass

    def _warn_once(self, key: str, fmt: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            LOG.warning(fmt + " (logged once; see the counters)", *args)

    def _ours(self, msg) -> bool:
        """Only the adopted datapath's messages count: a refused one may still be sending."""
        return msg.datapath is self.dp

    @set_ev_cls(ofp_event.EventOFPPortDescStatsReply, MAIN_DISPATCHER)
    def _port_desc(self, ev) -> None:
        with self.lock:
            if not self._ours(ev.msg):
                return
            for p in ev.msg.body:
                if p.port_no <= ofproto_v1_3.OFPP_MAX:
                    self.port_no[p.name.decode()] = p.port_no
                elif p.port_no == OFPP_LOCAL:
                    self.local_name = p.name.decode()
            self._refresh()
            self.ready.set()
        self.purger.kick()

    @set_ev_cls(ofp_event.EventOFPPortStatus, MAIN_DISPATCHER)
    def _port_status(self, ev) -> None:
        msg = ev.msg
        ofp = msg.datapath.ofproto
        name = msg.desc.name.decode()
        with self.lock:
            if not self._ours(msg):
                return
            if msg.reason == ofp.OFPPR_DELETE:
                if self.port_no.get(name) == msg.desc.port_no:
                    del self.port_no[name]
            elif msg.desc.port_no <= ofp.OFPP_MAX:
                self.port_no[name] = msg.desc.port_no
            self._refresh()
        self.purger.kick()  # not here: this thread must stay free to read the barrier reply

    @set_ev_cls(ofp_event.EventOFPFlowRemoved, MAIN_DISPATCHER)
    def _flow_removed(self, ev) -> None:
        msg = ev.msg
        with self.lock:
            if not self._ours(msg):
                return
            guard = self.guard_cookies.pop(msg.cookie, None)
            if guard is not None:  # a guard flow went (its port left or changed): keep its count
                kind, name = guard
                total, per_port = GUARD[kind]
                self.counters[total] += msg.packet_count
                if name in self.local_decl:
                    self.port_gone.setdefault(name, Counter())[per_port] += msg.packet_count
            if msg.cookie >> 48 in SOCIAL_KINDS[:2]:  # a friend port went: keep its count
                self.social.count([msg], self.social_gone, SOCIAL_KINDS)
            rec = self.flows.pop_cookie(msg.cookie)  # O(1): no scan
            if rec is None:
                return
            if msg.cookie >> 48 == K_MARKER:
                mac = packets.mac_bytes(rec.match["eth_src"])
                e = self.macs.get(mac)
                if e:
                    e.seen.discard((rec.match["in_port"], rec.match["vlan_vid"]))
                    if not e.seen:  # aged out everywhere: forget it
                        self.macs.remove(mac)
                        self._del_flow(T_L2, 100, {"eth_dst": rec.match["eth_src"]})

    @set_ev_cls([ofp_event.EventOFPFlowStatsReply, ofp_event.EventOFPPortStatsReply, ofp_event.EventOFPBarrierReply],
                MAIN_DISPATCHER)
    def _reply(self, ev) -> None:
        msg = ev.msg
        w = self.waiters.get(msg.xid)
        if not w or not self._ours(msg):
            return
        if hasattr(msg, "body"):
            w[1].extend(msg.body)
            if msg.flags & msg.datapath.ofproto.OFPMPF_REPLY_MORE:
                return
        w[0].set()

    # ------------------------------------------------------------------ packet-in
    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def _packet_in(self, ev) -> None:
        msg = ev.msg
        in_port = msg.match["in_port"]
        kind = msg.cookie >> 48
        with self.lock:
            if not self._ours(msg):
                return
            self.counters["packet_in"] += 1
            try:
                f = packets.parse(msg.data)
            except packets.BadFrame:
                self.counters["bad_frames"] += 1
                return
            if in_port not in self.local_ports and in_port not in self.port_peer:
                return
            moved = self._learn(in_port, f)
            if kind in (K_SNOOP, K_ARP_REQ, K_NS):
                self._snoop_neighbours(f)
            # a station new here (or just moved here) gets its request flooded, not answered:
            # the flood is what teaches every other node where it now lives
            if kind == K_ARP_REQ:
                self._arp_request(in_port, f, msg.data, suppress=not moved)
            elif kind == K_NS:
                self._ns(in_port, f, msg.data, suppress=not moved)
            elif kind == K_SYN:
                self._syn(in_port, f, msg.data)

    def _learn(self, in_port: int, f: packets.Frame) -> bool:
        """Update the MAC table from a frame's source; True if the MAC is new here or moved."""
        if f.src[0] & 1 or f.src == b"\0" * 6:
            return False  # multicast/zero source: never a station
        owner: str | None = None
        vid = 0
        if in_port in self.local_ports:
            owner = self.node_id or "self"
        elif f.tags:
            vid = VID_PRESENT | f.tags[0]
            rp = self.plan.by_index(f.tags[0]) if self.plan else None
            ok = (rp is not None and len(f.tags) >= 2 and rp.root != self.node_id
                  and rp.parent == self.port_peer.get(in_port) and f.tags[1] == rp.dist)
            if not ok:
                return False  # a transient flood the tree check drops anyway: learn nothing from it
            owner = rp.root
        e = self.macs.get(f.src)
        mac = packets.mac_str(f.src)
        me = self.node_id or "self"
        was_here = e is not None and e.owner == me
        if e is None:
            e = MacEntry(port=in_port, owner=owner)
            e.port = self._port_for(e, in_port)  # counted against the port it will point to
            if not self.macs.add(f.src, e):  # over a cap: not learned, its frames still flood
                self.counters["macs_refused"] += 1
                self._warn_once("macs", "MAC table full (%d in total, %d behind port %d): %s not learned",
                                len(self.macs), self.macs.on_port(e.port), e.port, mac)
                return False
            changed = True
        elif owner is not None and owner != e.owner:
            e.owner, changed = owner, True  # a move (or first authoritative sighting)
        elif owner is None and e.owner is None and e.port != in_port:
            changed = True
        elif owner is None and e.owner == me and in_port not in self.local_ports:
            e.owner, changed = None, True  # a local MAC now talks from a peer port: it moved
        elif owner == me and e.port != in_port:
            changed = True  # moved between two local ports (its old port may still be there, silent)
        else:
            changed = False
        if changed:
            self.macs.set_port(e, self._port_for(e, in_port))
            for old in list(e.seen):  # other sightings are stale now: let them trap again
                if old != (in_port, vid):
                    self._del_flow(T_TRAP, 100, {"in_port": old[0], "eth_src": mac, "vlan_vid": old[1]})
            e.seen = {k for k in e.seen if k == (in_port, vid)}
            self._pointer(f.src, e)
        if (in_port, vid) not in e.seen:
            e.seen.add((in_port, vid))
            self._add_flow(T_TRAP, 100, {"in_port": in_port, "eth_src": mac, "vlan_vid": vid},
                           goto=T_FLOOD_IN, kind=K_MARKER, idle=self.settings.aging)
        if changed and owner == me and not was_here and not f.dst[0] & 1:
            # here from elsewhere (a migrated VM, a re-created container with a warm ARP cache) and
            # its first frame is unicast, so no flood tells the other nodes: the old node would keep
            # the MAC (a black hole while its port lingers). Announce it, as QEMU does after a migration.
            self._resubmit(in_port, packets.rarp_announce(f.src))
            self.counters["moves_announced"] += 1
        return changed

    def _port_for(self, e: MacEntry, fallback: int) -> int:
        if e.owner is None or e.owner == (self.node_id or "self"):
            return fallback
        rp = self.plan.roots.get(e.owner) if self.plan else None
        if rp is None or rp.parent is None:
            return fallback
        return self.peer_port.get(rp.parent, fallback)

    def _pointer(self, mac: bytes, e: MacEntry) -> None:
        self._add_flow(T_L2, 100, {"eth_dst": packets.mac_str(mac)}, out=[e.port], kind=K_POINTER)

    def _snoop_neighbours(self, f: packets.Frame) -> None:
        now = time.monotonic()
        a = packets.parse_arp(f)
        if a is not None:
            if a.spa != "0.0.0.0":
                self._bind_ip(a.spa, a.sha, now)
            return
        nd = packets.parse_nd(f)
        if nd is None:
            return
        if nd.type == packets.ND_NS and nd.src_ip != "::" and nd.lladdr:
            self._bind_ip(nd.src_ip, nd.lladdr, now)
        elif nd.type == packets.ND_NA and nd.lladdr:
            self._bind_ip(nd.target, nd.lladdr, now)

    def _bind_ip(self, ip: str, mac: bytes, now: float) -> None:
        """Remember ip -> mac; past the cap the least recently seen binding goes."""
        self.ips.pop(ip, None)
        self.ips[ip] = (mac, now)
        if len(self.ips) > self.settings.max_macs:
            del self.ips[next(iter(self.ips))]
            self.counters["neighbours_evicted"] += 1

    def _known(self, ip: str, asker: bytes) -> bytes | None:
        """The MAC for ip if it is known and that MAC is alive in the table (not aged out)."""
        hit = self.ips.get(ip)
        if hit is None:
            return None
        mac, _ = hit
        if mac == asker or mac not in self.macs:
            return None
        return mac

    def _arp_request(self, in_port: int, f: packets.Frame, data: bytes, *, suppress: bool) -> None:
        a = packets.parse_arp(f)
        if a is not None and a.op == 1 and (mac := self.social.arp_answer(a.tpa)) is not None:
            self._packet_out(packets.arp_reply(a, mac), [in_port])  # a friend's address in our view
            self.counters["social_arp"] += 1
            return
        if suppress and a is not None and a.op == 1 and a.spa != a.tpa and a.spa != "0.0.0.0":
            mac = self._known(a.tpa, a.sha)
            if mac is not None:
                self._packet_out(packets.arp_reply(a, mac), [in_port])
                self.counters["arp_suppressed"] += 1
                return
        self._resubmit(in_port, data)

    def _ns(self, in_port: int, f: packets.Frame, data: bytes, *, suppress: bool) -> None:
        nd = packets.parse_nd(f)
        if suppress and nd is not None and nd.type == packets.ND_NS and nd.src_ip != "::":
            mac = self._known(nd.target, f.src)
            if mac is not None:
                self._packet_out(packets.neighbour_advert(nd, mac), [in_port])
                self.counters["nd_suppressed"] += 1
                return
        self._resubmit(in_port, data)

    def _syn(self, in_port: int, f: packets.Frame, data: bytes) -> None:
        res = packets.clamp_mss(f, self.mtu - 40, self.mtu - 60) if self.mtu else None
        if res is not None:
            data = res[0]
            if res[1] > (self.mtu - 40 if f.ethertype == packets.ETH_IP else self.mtu - 60):
                self.counters["mss_clamped"] += 1
        self._resubmit(in_port, data)

    def _packet_out(self, data: bytes, ports: list[int]) -> None:
        dp = self.dp
        ofp, parser = dp.ofproto, dp.ofproto_parser
        acts = [parser.OFPActionOutput(p if p != OFPP_LOCAL else ofp.OFPP_LOCAL) for p in ports]
        # in_port=CONTROLLER: output to the asker's own port is then allowed
        dp.send_msg(parser.OFPPacketOut(dp, buffer_id=ofp.OFP_NO_BUFFER, in_port=ofp.OFPP_CONTROLLER,
                                        actions=acts, data=data))

    def _resubmit(self, in_port: int, data: bytes) -> None:
        """Send a trapped frame on through the pipeline after table 0, with its own in_port."""
        dp = self.dp
        ofp, parser = dp.ofproto, dp.ofproto_parser
        dp.send_msg(parser.OFPPacketOut(dp, buffer_id=ofp.OFP_NO_BUFFER, in_port=in_port,
                                        actions=[parser.NXActionResubmitTable(table_id=T_FLOOD_IN)], data=data))

    # ------------------------------------------------------------------ state -> flows
    def _refresh(self) -> None:
        """Recompute ports, the flooding plan and the base flows after any change; fix pointers."""
        if self.dp is None:
            return
        peer_port: dict[str, int] = {}
        for name, peer in sorted(self.peer_decl.items(), key=lambda kv: self.port_no.get(kv[0], 1 << 31)):
            no = self.port_no.get(name)
            if no is not None and peer != self.node_id and peer not in peer_port:
                peer_port[peer] = no  # several links to one peer: the lowest port number is used
        self.peer_port = peer_port
        self.port_peer = {v: k for k, v in peer_port.items()}
        self.local_ports = {OFPP_LOCAL} | {self.port_no[n] for n in self.local_decl if n in self.port_no}
        self.local_ports -= set(self.port_peer)
        self.plan = None
        if self.node_id:
            try:
                self.plan = flood.compute_plan(self.node_id, self._view())
            except ValueError as e:
                LOG.error("%s", e)
        self._install_base()
        valid = self.local_ports | set(self.port_peer)
        for port in [p for p in self.macs.refused if p not in valid]:
            self.macs.forget_port(port)
        locked = {self.port_no[n]: set(o.allowed_macs) for n, o in self.local_opts.items()
                  if o.allowed_macs is not None and self.port_no.get(n) in self.local_ports}
        for mac, e in list(self.macs.items()):
            ms = packets.mac_str(mac)
            # markers of a MAC a lock now forbids on that port would let its frames past the guard
            stale = {k for k in e.seen if k[0] not in valid or (k[0] in locked and ms not in locked[k[0]])}
            for port, vid in stale:
                self._del_flow(T_TRAP, 100, {"in_port": port, "eth_src": packets.mac_str(mac), "vlan_vid": vid})
            e.seen -= stale
            if e.owner is not None and e.owner != (self.node_id or "self") and (self.plan is None or e.owner not in self.plan.roots):
                e.owner = None
            if e.port not in valid and e.owner is None or not e.seen:
                self.macs.remove(mac)
                self._del_flow(T_L2, 100, {"eth_dst": packets.mac_str(mac)})
                continue
            port = self._port_for(e, e.port)
            if port != e.port or (T_L2, 100, _mkey({"eth_dst": packets.mac_str(mac)})) not in self.flows:
                self.macs.set_port(e, port)
                self._pointer(mac, e)

    def _view(self) -> dict[str, set[str]]:
        me = self.node_id
        assert me
        mine = set(self.peer_port)
        if self.topology is None:  # no graph from the agent: the peers are a full mesh
            nodes = [me, *mine]
            edges = [(a, b) for a in nodes for b in nodes if a < b]
        else:
            # own links: a port is used once the agent's graph has it too (the agent adds a new
            # link when the peer says it has its end: frames sent on it are not dropped there)
            told = {frozenset(e) for e in self.topology}
            edges = ([(a, b) for a, b in self.topology if me not in (a, b)]
                     + [(me, p) for p in mine if frozenset((me, p)) in told])
        return flood.normalize(me, edges)

    def _install_base(self) -> None:
        want: dict[tuple, dict] = {}

        def add(table: int, prio: int, match: dict, **kw: Any) -> None:
            want[(table, prio, _mkey(match))] = dict(table=table, priority=prio, match=match, **kw)

        locs = sorted(self.local_ports)
        peers = sorted(self.port_peer)
        names = {no: n for n, no in self.port_no.items()}
        guards: dict[tuple, tuple[int, str]] = {}  # flow key -> (kind, port name)

        def guard(prio: int, match: dict, kind: int, name: str) -> None:
            add(T_TRAP, prio, match, kind=kind, notify=True)  # a drop; flow-removed keeps its count
            guards[(T_TRAP, prio, _mkey(match))] = (kind, name)

        for p in locs + peers:
            opts = self.local_opts.get(names.get(p, ""), PortOpts()) if p != OFPP_LOCAL else PortOpts(True)
            if p in self.local_ports and not opts.dhcp_trusted:  # above everything: no trap may let these by
                name = names[p]
                guard(400, {"in_port": p, "eth_type": 0x0800, "ip_proto": 17, "udp_src": 67, "udp_dst": 68}, K_DHCP, name)
                guard(400, {"in_port": p, "eth_type": 0x86DD, "ip_proto": 17, "udp_src": 547, "udp_dst": 546},
                      K_DHCP, name)
                guard(400, {"in_port": p, "eth_type": 0x86DD, "ip_proto": 58, "icmpv6_type": 134}, K_RA, name)
            # a MAC-locked port: every flow of it names the allowed source; anything else falls to the drop
            srcs: list[dict] = [{}]
            if p in self.local_ports and opts.allowed_macs is not None:
                srcs = [{"eth_src": m} for m in opts.allowed_macs]
                guard(2, {"in_port": p}, K_SPOOF, names[p])  # 2: never the key of an open port's learning flow
            for src in srcs:
                if p in self.local_ports:
                    if self.mtu:
                        for et in (0x0800, 0x86DD):
                            add(T_TRAP, 300, {"in_port": p, **src, "eth_type": et, "ip_proto": 6,
                                              "tcp_flags": (0x002, 0x002)}, to_ctl=True, kind=K_SYN)
                    add(T_TRAP, 250, {"in_port": p, **src, "eth_type": 0x0806, "arp_op": 1}, to_ctl=True,
                        kind=K_ARP_REQ)
                    add(T_TRAP, 250, {"in_port": p, **src, "eth_type": 0x86DD, "ip_proto": 58, "icmpv6_type": 135},
                        to_ctl=True, kind=K_NS)
                add(T_TRAP, 200, {"in_port": p, **src, "eth_type": 0x0806}, to_ctl=True, goto=T_FLOOD_IN,
                    kind=K_SNOOP)
                for t in (135, 136):
                    if t == 135 and p in self.local_ports:
                        continue
                    add(T_TRAP, 200, {"in_port": p, **src, "eth_type": 0x86DD, "ip_proto": 58, "icmpv6_type": t},
                        to_ctl=True, goto=T_FLOOD_IN, kind=K_SNOOP)
                add(T_TRAP, 3 if src else 1, {"in_port": p, **src}, to_ctl=True, goto=T_FLOOD_IN, kind=K_LEARN_MISS,
                    max_len=128)
        add(T_TRAP, 0, {}, kind=K_BASE)  # unknown ports: drop
        for p in peers:  # tagged frames that fail the tree check, untagged multicast from peers: drop
            add(T_FLOOD_IN, 50, {"in_port": p, "vlan_vid": (VID_PRESENT, VID_PRESENT)}, kind=K_BASE)
            add(T_FLOOD_IN, 40, {"in_port": p, "eth_dst": MCAST}, kind=K_BASE)
        add(T_FLOOD_IN, 0, {}, goto=T_L2, kind=K_BASE)
        add(T_FLOOD, 0, {}, kind=K_BASE)
        plan = self.plan
        if plan is not None:
            for rp in plan.roots.values():
                if rp.root == plan.me or rp.parent not in self.peer_port:
                    continue
                add(T_FLOOD_IN, 100, {"in_port": self.peer_port[rp.parent], "vlan_vid": VID_PRESENT | rp.index},
                    meta=rp.index, pop=1, goto=T_FLOOD, kind=K_BASE)
                add(T_FLOOD, 100, {"metadata": rp.index, "vlan_vid": VID_PRESENT | rp.dist},
                    flood=(rp.index, rp.dist + 1, [self.peer_port[c] for c in rp.children if c in self.peer_port], 1),
                    kind=K_BASE)
            me = plan.roots[plan.me]
            origin = (me.index, 1, [self.peer_port[c] for c in me.children if c in self.peer_port], 0)
        else:
            origin = (0, 0, [], 0)
        add(T_L2, 0, {}, flood=origin, kind=K_BASE)
        self.social.flows(self.port_no, OFPP_LOCAL, add, SOCIAL_KINDS)  # friend ports (SocialVPN), if any
        changed = False
        for key in self.base_keys - set(want):
            r = self.flows.get(key)
            if r:
                self._del_flow(r.table, r.priority, r.match)
                changed = True
        for key, spec in want.items():
            changed |= self._add_flow(**spec)
            if key in guards:
                self.guard_cookies[self.flows.get(key).cookie] = guards[key]
        self.base_keys = set(want)
        if changed:
            self.purger.due = True

    # ------------------------------------------------------------------ flow-mod helpers
    def _actions(self, spec: dict) -> tuple[list, str]:
        """OpenFlow instructions for a flow spec, and a text form to detect changes."""
        dp = self.dp
        ofp, parser = dp.ofproto, dp.ofproto_parser
        acts: list = []
        insts: list = []
        text: list[str] = []
        if spec.get("to_ctl"):
            acts.append(parser.OFPActionOutput(ofp.OFPP_CONTROLLER, spec.get("max_len", ofp.OFPCML_NO_BUFFER)))
            text.append("ctl")
        for _ in range(spec.get("pop", 0)):
            acts.append(parser.OFPActionPopVlan())
            text.append("pop")
        for field, value in spec.get("set", ()):
            acts.append(parser.OFPActionSetField(**{field: value}))
            text.append(f"set:{field}={value}")
        for p in spec.get("out", []):
            acts.append(parser.OFPActionOutput(p))
            text.append(f"out:{p}")
        fl = spec.get("flood")
        if fl is not None:
            idx, depth, children, tagged_in = fl
            if children:
                if tagged_in:  # frame carries the depth tag only (root tag popped in table 1)
                    acts.append(parser.OFPActionSetField(vlan_vid=VID_PRESENT | depth))
                else:
                    acts += [parser.OFPActionPushVlan(0x8100), parser.OFPActionSetField(vlan_vid=VID_PRESENT | depth)]
                acts += [parser.OFPActionPushVlan(0x8100), parser.OFPActionSetField(vlan_vid=VID_PRESENT | idx)]
                acts += [parser.OFPActionOutput(c) for c in children]
                acts += [parser.OFPActionPopVlan(), parser.OFPActionPopVlan()]
            elif tagged_in:
                acts.append(parser.OFPActionPopVlan())
            acts += [parser.OFPActionOutput(p) for p in sorted(self.local_ports)]
            text.append(f"flood:{idx}:{depth}:{children}:{tagged_in}:{sorted(self.local_ports)}")
        if acts:
            insts.append(parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, acts))
        if "meta" in spec:
            insts.append(parser.OFPInstructionWriteMetadata(spec["meta"], 0xFFFF))
            text.append(f"meta:{spec['meta']}")
        if "goto" in spec:
            insts.append(parser.OFPInstructionGotoTable(spec["goto"]))
            text.append(f"goto:{spec['goto']}")
        return insts, " ".join(text) or "drop"

    def _add_flow(self, table: int, priority: int, match: dict, *, kind: int, idle: int = 0, notify: bool = False,
                  **spec: Any) -> bool:
        """Install (or change) a flow; False if the switch has it already as asked."""
        dp = self.dp
        if dp is None:
            return False
        ofp, parser = dp.ofproto, dp.ofproto_parser
        key = (table, priority, _mkey(match))
        insts, text = self._actions(spec)
        old = self.flows.get(key)
        if old is not None and old.actions == text and old.idle == idle:
            return False
        cookie = old.cookie if old is not None else (kind << 48) | next(self.serial)
        cmd = ofp.OFPFC_MODIFY_STRICT if old is not None and old.idle == idle else ofp.OFPFC_ADD
        flags = ofp.OFPFF_SEND_FLOW_REM if idle or notify else 0
        dp.send_msg(parser.OFPFlowMod(dp, cookie=cookie, table_id=table, command=cmd, idle_timeout=idle,
                                      priority=priority, flags=flags, match=parser.OFPMatch(**match),
                                      instructions=insts))
        self.flows.put(key, FlowRec(cookie, table, priority, match, text, idle))
        self.counters["flows_installed"] += 1
        return True

    def _del_flow(self, table: int, priority: int, match: dict) -> None:
        key = (table, priority, _mkey(match))
        if self.flows.pop(key) is None or self.dp is None:
            return
        dp = self.dp
        ofp, parser = dp.ofproto, dp.ofproto_parser
        dp.send_msg(parser.OFPFlowMod(dp, table_id=table, command=ofp.OFPFC_DELETE_STRICT, priority=priority,
                                      out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY, match=parser.OFPMatch(**match)))

    def _request(self, msg, timeout: float = 3.0) -> list | None:
        """Send a request and wait for its (multipart) reply; None on timeout."""
        ev, body = threading.Event(), []
        with self.lock:
            self.dp.set_xid(msg)
            self.waiters[msg.xid] = (ev, body)
            self.dp.send_msg(msg)
        try:
            return body if ev.wait(timeout) else None
        finally:
            self.waiters.pop(msg.xid, None)

    # ------------------------------------------------------------------ channel requests
    def handle(self, req: Any) -> dict:
        op = req.op
        if op == "status":
            with self.lock:
                return ch.ok(connected=self.dp is not None and self.ready.is_set(),
                             dpid=self.dp.id if self.dp else None, node_id=self.node_id,
                             limits={"max_macs": self.macs.max_total, "max_macs_per_port": self.macs.max_per_port},
                             ports={n: {"ofport": no, "peer": self.port_peer.get(no),
                                        "local": no in self.local_ports} for n, no in self.port_no.items()},
                             social=self.social.status(self.port_no))
        if op == "counters":
            return ch.ok(counters=self._counters())
        if op == "ports":
            return ch.ok(ports=self._ports())
        if op == "owner_bytes":
            return ch.ok(owners=self._owner_bytes())
        if op == "flows":
            with self.lock:
                return ch.ok(flows=[{"cookie": r.cookie, "table": r.table, "priority": r.priority,
                                     "match": {k: (list(v) if isinstance(v, tuple) else v) for k, v in r.match.items()},
                                     "actions": r.actions} for r in self.flows.values()])
        if op == "macs":
            with self.lock:
                return ch.ok(macs={packets.mac_str(m): {"port": e.port, "owner": e.owner} for m, e in self.macs.items()})
        with self.lock:
            if op == "set_datapath":
                self.expected_dpid = req.dpid
                if self.dp is not None and self.dp.id != req.dpid:
                    self._refuse_datapath(self.dp, self.dp.id)
                    self.dp = None
                return ch.ok()  # nothing to push: the switch connects afterwards
            if op == "set_node_id":
                self.node_id = req.node_id
            elif op == "set_mtu":
                self.mtu = req.mtu
            elif op == "add_peer_port":
                self.peer_decl[req.port] = req.peer
                self.local_decl.discard(req.port)
                self.social.remove(req.port)
            elif op == "remove_peer_port":
                self.peer_decl.pop(req.port, None)
            elif op == "add_local_port":
                self.local_decl.add(req.port)
                self.local_opts[req.port] = PortOpts(req.dhcp_trusted, None if req.allowed_macs is None
                                                     else tuple(req.allowed_macs))
                self.peer_decl.pop(req.port, None)
                self.social.remove(req.port)
            elif op == "remove_local_port":
                self.local_decl.discard(req.port)
                self.local_opts.pop(req.port, None)
            elif op == "set_topology":
                self.topology = [tuple(e) for e in req.edges]
            elif op in ("set_social", "add_friend_port", "remove_friend_port"):
                try:
                    if op == "set_social":
                        self.social.set_own(req.address, req.mac)
                    elif op == "add_friend_port":
                        self.social.add(req.port, req.peer, req.address)
                        self.peer_decl.pop(req.port, None)
                        self.local_decl.discard(req.port)
                    else:
                        self.social.remove(req.port)
                except ValueError as e:
                    return ch.error(str(e))
            self._refresh()
            dp = self.dp
        if dp is not None:  # the change is in the switch when the agent hears "ok"
            # (the flow-removed of a deleted guard flow comes before the barrier reply: counted by now)
            self._request(dp.ofproto_parser.OFPBarrierRequest(dp), timeout=2.0)
            self.purger.run_if_due()
        if op == "remove_local_port":
            with self.lock:
                if req.port not in self.local_decl:
                    self.port_gone.pop(req.port, None)
        return ch.ok()

    def _live_guards(self, body: list) -> Counter:
        """(kind, port name) -> packets of the guard flows in a flow-stats reply that are still
        installed (a removed one's count was added from its flow-removed: never twice)."""
        live: Counter = Counter()
        for s in body:
            g = self.guard_cookies.get(s.cookie)
            if g is not None:
                live[g] += s.packet_count
        return live

    def _counters(self) -> dict[str, int]:
        dp = self.dp
        body = [] if dp is None else (
            self._request(dp.ofproto_parser.OFPFlowStatsRequest(dp, table_id=dp.ofproto.OFPTT_ALL)) or [])
        with self.lock:  # read after the reply: a guard flow removed meanwhile is in the counters already
            c = dict(self.counters)
            c["flows_active"] = len(self.flows)
            c["macs_learned"] = len(self.macs)
            for (kind, _), n in self._live_guards(body).items():
                c[GUARD[kind][0]] += n
            for k, n in self.social_gone.items():
                c[k] += n
        self.social.count(body, c, SOCIAL_KINDS)
        for s in body:
            if s.cookie >> 48 != K_BASE:
                continue
            if s.table_id == T_L2 and s.priority == 0:
                c["flooded_origin"] += s.packet_count
            elif s.table_id == T_FLOOD and s.priority == 100:
                c["flooded_transit"] += s.packet_count
            elif (s.table_id, s.priority) in ((T_FLOOD, 0), (T_FLOOD_IN, 40), (T_FLOOD_IN, 50)):
                c["flood_dropped"] += s.packet_count
        return c


    def _owner_bytes(self) -> dict[str, int]:
        """Bytes forwarded by the unicast pointer flows (table 3), summed per owner node of the
        destination MAC: this node's traffic towards each member, transit included (frames it
        forwards for others on their way there). The agent's on-demand links use it. Counts
        restart when a flow is re-pointed (the agent takes a drop as a restart)."""
        dp = self.dp
        if dp is None:
            return {}
        kind_mask = 0x1F << 48
        body = self._request(dp.ofproto_parser.OFPFlowStatsRequest(
            dp, table_id=T_L2, cookie=K_POINTER << 48, cookie_mask=kind_mask)) or []
        out: Counter = Counter()
        with self.lock:
            me = self.node_id
            for s in body:
                rec = self.flows.by_cookie(s.cookie)
                if rec is None:
                    continue
                mac = rec.match.get("eth_dst")
                e = self.macs.get(packets.mac_bytes(mac)) if isinstance(mac, str) else None
                if e is not None and e.owner is not None and e.owner != me:
                    out[e.owner] += s.byte_count
        return dict(out)

    def _ports(self) -> dict[str, dict]:
        """Per local port: learned MACs, OVS port stats, drops by reason (see switch_channel)."""
        dp = self.dp
        if dp is None:
            return {}
        ofp, parser = dp.ofproto, dp.ofproto_parser
        stats = self._request(parser.OFPPortStatsRequest(dp, 0, ofp.OFPP_ANY)) or []
        flows = self._request(parser.OFPFlowStatsRequest(dp, table_id=T_TRAP, cookie=GUARD_BIT,
                                                         cookie_mask=GUARD_BIT)) or []
        by_no = {s.port_no: s for s in stats}
        with self.lock:
            live = self._live_guards(flows)
            names = {no: n for n, no in self.port_no.items()}
            names[OFPP_LOCAL] = self.local_name or "LOCAL"
            me = self.node_id or "self"
            behind: dict[int, list[str]] = {}
            for mac, e in self.macs.items():
                if e.owner == me:
                    behind.setdefault(e.port, []).append(packets.mac_str(mac))
            out: dict[str, dict] = {}
            for no in sorted(self.local_ports):
                name = names[no]
                opts = PortOpts(True) if no == OFPP_LOCAL else self.local_opts.get(name, PortOpts())
                gone = self.port_gone.get(name, Counter())
                drops = {per: gone[per] + live[(kind, name)] for kind, (_, per) in GUARD.items()}
                drops["macs_refused"] = self.macs.refused[no]
                st = by_no.get(no)
                out[name] = {
                    "ofport": no, "macs": sorted(behind.get(no, [])),
                    "rx_frames": st.rx_packets if st else 0, "rx_bytes": st.rx_bytes if st else 0,
                    "tx_frames": st.tx_packets if st else 0, "tx_bytes": st.tx_bytes if st else 0,
                    "drops": drops, "dhcp_trusted": opts.dhcp_trusted,
                    "allowed_macs": list(opts.allowed_macs) if opts.allowed_macs is not None else None,
                }
            return out


def _mkey(match: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in match.items()))


class _Purger:
    """Empties OVS's datapath flow cache after the base pipeline changed.

    Why: ovs-vswitchd 3.1 (userspace datapath, here) does not revalidate cached datapath
    flows whose key holds two VLAN headers -- our flood frames between nodes -- when the
    OpenFlow tables change: a flood flow that gained a local port (a guest attached) or a
    child (a link came up) kept delivering to the old set for as long as the frames kept
    the cache entry alive (measured: IPv6 neighbour solicitations from a guest never
    reached guests attached after the first ones). ``revalidator/purge`` drops the cache
    (the next frames are translated afresh); it runs only on port and topology changes.
    """

    def __init__(self, app: "OverlaySwitch") -> None:
        self.app, self.due = app, False
        self._kick = threading.Event()
        self._lock = threading.Lock()
        self.runs = 0
        rundir = app.settings.ovs_rundir
        if rundir:
            ctl = os.path.join(rundir, "ovs-vswitchd.ctl")  # a private instance; else the pid-named socket
            self.argv = ["ovs-appctl", "-t", ctl if os.path.exists(ctl) else "ovs-vswitchd", "revalidator/purge"]
            self.env = {**os.environ, "OVS_RUNDIR": rundir}
            threading.Thread(target=self._loop, name="purger", daemon=True).start()
        else:
            self.argv = []

    def kick(self) -> None:
        """From the switch's event thread: purge soon, after a barrier, in the purger's thread."""
        if self.due and self.argv:
            self._kick.set()

    def _loop(self) -> None:
        while True:
            self._kick.wait()
            self._kick.clear()
            dp = self.app.dp
            if dp is not None:
                self.app._request(dp.ofproto_parser.OFPBarrierRequest(dp), timeout=2.0)
            self.run_if_due()

    def run_if_due(self) -> None:
        """After a barrier (the new flows are in): purge if the pipeline changed since the last one."""
        with self._lock:
            if not self.due or not self.argv:
                return
            self.due = False
            try:
                r = subprocess.run(self.argv, env=self.env, capture_output=True, text=True, timeout=5)
                ok = r.returncode == 0
            except (OSError, subprocess.TimeoutExpired) as e:
                ok, r = False, e
            self.runs += 1
            if not ok:
                self.app._warn_once("purge", "could not purge the datapath flow cache (%s): %s", " ".join(self.argv),
                                    getattr(r, "stderr", r))


class _ChannelServer:
    """Unix socket, JSON lines; one thread per client (the agent keeps one connection)."""

    def __init__(self, path: str, app: OverlaySwitch) -> None:
        self.path, self.app = path, app
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.sock.listen(4)

    def serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as rf:
            for line in rf:
                try:
                    reply = self.app.handle(ch.parse_request(line))
                except ch.ChannelError as e:
                    reply = ch.error(str(e))
                except Exception as e:  # a bug must not kill the channel
                    LOG.exception("channel request failed")
                    reply = ch.error(f"internal error: {type(e).__name__}: {e}")
                try:
                    conn.sendall(ch.encode(reply))
                except OSError:
                    return
