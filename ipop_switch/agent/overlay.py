"""One overlay on this node: its bridge and switch app, its signaling session, and
the links to its peers.

Which members get a link is the topology's decision (``agent/topology.py``: all-to-all
up to ``topology.all_to_all_max`` members, a Symphony ring with on-demand links above).
Link supervision: a link is a worker in the pool; the worker runs ICE, the handshake and
its own retries, and tells us when its TAP carries traffic (port added to the bridge and
announced to the switch app) and when it stops (port removed). Each node tells every
member which links it has up (a signed link-state advertisement), so the switch app
floods and forwards over the real overlay graph, through other members where two are
not linked.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..bridge.controller import SwitchController
from ..bridge.guests import GuestPorts
from ..bridge.overlay_bridge import OverlayBridge, stable_mac
from ..bridge.port_watch import PortWatch
from ..config import OverlayConfig
from ..errors import IpopError
from ..identity.store import NodeIdentity
from ..tunnel.messages import LinkSpec, TurnServer
from ..topology import TopologyParams
from ..tunnel.timers import Timers
from .dns import dns_caps, start_dns
from .guests import OverlayGuests
from .summaries import MESSAGE_TYPES as SUMMARY_TYPES, for_overlay as summaries_for
from .topology import MESSAGE_TYPES as TOPOLOGY_TYPES, Hooks, OverlayTopology

log = logging.getLogger("ipop_switch.agent")

LINK_TYPES = ("link_offer", "link_answer", "link_close", "link_restart", "link_probe", "link_probe_answer")
SIGNALING_START_TIMEOUT = 15.0
LINK_TIMERS_ENV = "IPSW_LINK_TIMERS"


def link_timers() -> dict[str, float]:
    """Per-link timer overrides from $IPSW_LINK_TIMERS (JSON, e.g. '{"rekey_after": 4}'):
    lets the lab tests see a rekey or an upgrade probe in seconds instead of minutes.
    Unset, every link runs the defaults of tunnel/timers.py."""
    raw = os.environ.get(LINK_TIMERS_ENV)
    if not raw:
        return {}
    try:
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        Timers.from_dict(d)
    except ValueError as e:
        raise IpopError(f"{LINK_TIMERS_ENV}: {e}") from None
    return d


@dataclass
class PeerLink:
    node_id: str
    subject: str
    tunnel_public: bytes
    link_id: str
    tap: str
    state: str = "connecting"          # connecting | up | closed
    port: bool = False                 # the TAP is a port of the bridge
    path: str | None = None
    local: str | None = None
    remote: str | None = None
    since: float = field(default_factory=time.monotonic)
    up_since: float | None = None
    ups: int = 0
    last_reason: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def tap_name(overlay: str, peer_id: str) -> str:
    """<= 15 chars, unique per (overlay, peer) on this node."""
    h = hashlib.sha256(f"{overlay}/{peer_id}".encode()).hexdigest()[:9]
    return f"ipt{overlay[:3]}{h}"


class Overlay:
    def __init__(self, cfg: OverlayConfig, node, *, index: int = 0) -> None:
        self.cfg = cfg
        self.node = node
        self.index = index
        self.links: dict[str, PeerLink] = {}          # by peer node id
        self.by_link_id: dict[str, PeerLink] = {}
        self.topology: OverlayTopology | None = None
        self.traffic_bytes: dict[str, int] = {}        # the switch app's bytes per member, last read
        self.drops: dict[str, int] = {}                # link messages dropped here, by reason
        self.signaling = None
        self.switch: SwitchController | None = None
        self.bridge: OverlayBridge | None = None
        self.guests: OverlayGuests | None = None
        self.port_watch: PortWatch | None = None      # the system's OVS: ports others plug in are guests
        self.sig_state = "starting"
        self.switch_counters: dict[str, int] = {}  # the switch app's counters, as of the last status
        self.switch_ports: dict[str, dict] = {}    # per local port: MACs, traffic, drops (last status)
        self._ports_task: asyncio.Task | None = None
        self._counters_task: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self._lock = asyncio.Lock()
        self.dns = None                               # the overlay's DNS responder ([overlay.dns], agent/dns.py)
        self.social = None                            # kind = "social": agent/social.py's part
        self.summaries = None                         # link summaries for the web view (agent/summaries.py)
        if cfg.kind == "social":
            from .social import SocialPart
            self.social = SocialPart(self)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        ident = NodeIdentity.load(self.node.cfg.node.identity_dir)
        self.me = self.social.identity(ident) if self.social else ident.membership(self.cfg.name)
        self.timers = link_timers()
        self.node_id = ident.node_id
        self.node.node_id = ident.node_id
        self.tunnel_private = ident.tunnel_private_bytes()
        self.bridge = OverlayBridge(self.node.ovs, self.cfg.bridge, netns=self.node.netns)
        self.bridge.create(mac=stable_mac(self.node_id, self.cfg.name), mtu=self.cfg.mtu,
                           address=self.cfg.address, address6=self.cfg.address6)
        self.switch = SwitchController(self.node.ovs, self.cfg.bridge, mtu=self.cfg.mtu, log_dir=self.node.switch_log_dir)
        await self.switch.start()
        await self.switch.set_node_id(self.node_id)
        await self.switch.add_local_port(self.cfg.bridge)     # LOCAL: the node itself (DHCP-trusted)
        if self.social:
            await self.social.switch_ready()
        self.guests = OverlayGuests(GuestPorts(self.node.ovs, self.cfg.bridge, self.cfg.name, mtu=self.cfg.mtu,
                                               netns=self.node.netns), self.switch, self.cfg.name)
        await self.guests.attach_configured(self.cfg.attach)
        if self.node.ovs.external:
            self.port_watch = PortWatch(self.node.ovs, self._sync_ovs_ports)
            self.port_watch.start()
        self.signaling = self.social.make_signaling(self.me) if self.social else make_signaling(self.cfg, self.me)
        self.topology = self.social.make_topology() if self.social else OverlayTopology(
            self.node_id, topology_params(self.cfg), Hooks(
                members=lambda: self.signaling.peers().keys(), send=self.signaling.send,
                open_link=self._open_member, close_link=self._close_member,
                up_links=self._my_neighbours, set_topology=self.switch.set_topology))
        if not await self.signaling.start(wait_online=SIGNALING_START_TIMEOUT):
            # an unreachable server is not fatal for a VPN daemon: the session keeps trying with
            # back-off (status says where and when); a refused login or TLS still ends the node
            log.warning("event=signaling_connecting overlay=%s servers=%s error=%s (still trying)", self.cfg.name,
                        self.cfg.xmpp.where(), self.signaling.status().get("last_error") or "no answer")
            self._tasks.append(asyncio.create_task(self._signaling_first(), name=f"sig-first-{self.cfg.name}"))
        self._tasks.append(asyncio.create_task(self._signaling_loop(), name=f"sig-{self.cfg.name}"))
        self._tasks.append(asyncio.create_task(self._watch_switch(), name=f"switch-{self.cfg.name}"))
        self._tasks.append(asyncio.create_task(self._watch_traffic(), name=f"traffic-{self.cfg.name}"))
        self.topology.start()
        self.summaries = None if self.social else summaries_for(self)
        self.dns = await start_dns(self)
        log.info("event=overlay_up overlay=%s bridge=%s address=%s", self.cfg.name, self.cfg.bridge, self.cfg.address)

    async def _signaling_first(self) -> None:
        """The first login after a start that found no server: a refused password or an
        untrusted server certificate then ends the node with one clear line, as at start."""
        from ..signaling.xmpp import SignalingError
        try:
            await self.signaling.first_online()
        except SignalingError as e:
            log.error("event=signaling_failed overlay=%s error=%s", self.cfg.name, e)
            self.node.fail(f"overlay {self.cfg.name}: {e}")

    async def stop(self) -> None:
        if self.dns:
            await self.dns.stop()
        if self.summaries:
            await self.summaries.stop()
        for t in self._tasks:
            t.cancel()
        if self.topology:
            await self.topology.stop()
        for link in list(self.links.values()):
            await self._close_link(link, "shutdown", notify=True)
        if self.signaling:
            try:
                await asyncio.wait_for(self.signaling.stop(), 5)
            except Exception as e:
                log.warning("event=signaling_stop_failed error=%s", e)
        if self.port_watch:
            await self.port_watch.stop()
        if self.guests:
            await self.guests.stop()          # our veths go; interfaces we do not own stay
        if self.switch:
            await self.switch.stop()
        if self.bridge:
            self.bridge.destroy()

    async def refresh_switch_counters(self, timeout: float = 2.0) -> None:
        """The switch app's counters for status (drops: macs_refused, packet_in_dropped, ...).
        A slow answer is not cancelled (that would leave its reply on the channel for the
        next request): status goes on with the last counters, the request finishes later."""
        if self.switch is None or not self.switch.alive():
            return
        if self._counters_task is None or self._counters_task.done():
            self._counters_task = asyncio.create_task(self.switch.counters())
            self._counters_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            self.switch_counters = await asyncio.wait_for(asyncio.shield(self._counters_task), timeout)
        except Exception as e:
            log.debug("event=switch_counters_failed overlay=%s error=%s", self.cfg.name, e)
        if self.guests is None or not (self.guests.ports.guests or self.guests.ovs_ports):
            return
        if self._ports_task is None or self._ports_task.done():
            self._ports_task = asyncio.create_task(self.switch.ports())
            self._ports_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            self.switch_ports = await asyncio.wait_for(asyncio.shield(self._ports_task), timeout)
        except Exception as e:
            log.debug("event=switch_ports_failed overlay=%s error=%s", self.cfg.name, e)

    async def _sync_ovs_ports(self) -> None:
        """OVS says the ports changed: the bridge's foreign ports become (or stop being) guests."""
        await self.guests.sync_ovs_ports(self.bridge.foreign_ports)

    async def _watch_switch(self, interval: float = 2.0) -> None:
        """The app is a child process: if it dies, restart it (flows already in OVS keep forwarding)."""
        while True:
            await asyncio.sleep(interval)
            if not self.switch.alive():
                log.warning("event=switch_app_died overlay=%s", self.cfg.name)
                try:
                    await self.switch.restart()
                    log.info("event=switch_app_restarted overlay=%s", self.cfg.name)
                except Exception as e:
                    log.error("event=switch_app_restart_failed overlay=%s error=%s", self.cfg.name, e)

    # -- signaling events ------------------------------------------------------------------
    async def _signaling_loop(self) -> None:
        from ..signaling import events as ev
        async for e in self.signaling.events():
            try:
                if isinstance(e, (ev.PeerAppeared, ev.PeerChanged, ev.PeerRefreshed)):
                    await self._peer_seen(e.peer, changed=isinstance(e, ev.PeerChanged))
                elif isinstance(e, ev.PeerLeft):
                    link = self.links.get(e.node_id)
                    if link:
                        await self._close_link(link, f"peer left: {e.reason}", notify=False)
                    self.topology.member_left(e.node_id)
                elif isinstance(e, ev.PeerMessage):
                    await self._peer_message(e.node_id, e.type, e.payload)
                elif isinstance(e, ev.SessionState):
                    self.sig_state = "online" if e.online else f"offline ({e.detail})" if e.detail else "offline"
                    if e.online:
                        self.topology.poke()
                elif isinstance(e, ev.SendFailed):
                    log.info("event=send_failed overlay=%s peer=%s type=%s reason=%s", self.cfg.name, e.node_id, e.type, e.reason)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=overlay_event_failed overlay=%s", self.cfg.name)

    async def _peer_seen(self, peer, *, changed: bool) -> None:
        link = self.links.get(peer.node_id)
        if link and changed and link.tunnel_public != peer.tunnel_public:
            await self._close_link(link, "peer certificate changed", notify=False)
            if self.topology.knows(peer.node_id):       # still wanted: a new link with the new keys
                await self._open_link(peer)
        self.topology.member_appeared(peer.node_id)

    async def _open_member(self, node_id: str) -> bool:
        """The topology's hook: a link to this member (True: there is one now)."""
        if node_id in self.links:
            return True
        peer = self.signaling.peer(node_id)
        return peer is not None and await self._open_link(peer) is not None

    async def _close_member(self, node_id: str, reason: str) -> None:
        link = self.links.get(node_id)
        if link is not None:
            await self._close_link(link, reason, notify=True)

    async def _open_link(self, peer) -> PeerLink | None:
        if peer.node_id in self.links:
            return self.links[peer.node_id]
        if len(self.links) >= self.cfg.max_peers:
            log.warning("event=peer_limit overlay=%s peer=%s max_peers=%d", self.cfg.name, peer.node_id, self.cfg.max_peers)
            return None
        ice = self.cfg.ice
        turn = None
        if ice.turn_addr():
            host, port = ice.turn_addr()
            turn = TurnServer(host, port, ice.turn_user or "", ice.turn_password or "", ice.turn_transport)
        # the same id on both ends: the tunnel handshake binds it (its prologue)
        link_id = f"{self.cfg.name}:{min(self.node_id, peer.node_id)}:{max(self.node_id, peer.node_id)}"
        link = PeerLink(peer.node_id, peer.subject, peer.tunnel_public, link_id, tap_name(self.cfg.name, peer.node_id))
        spec = LinkSpec(
            link_id=link_id, peer_id=peer.node_id, controlling=self.node_id > peer.node_id,
            local_static=self.tunnel_private, peer_static=peer.tunnel_public, tap=link.tap,
            mtu=self.cfg.mtu + 8,  # flood frames carry two VLAN tags between nodes (docs/switch.md)
            stun=ice.stun_addr(), turn=turn,
            exclude_interfaces=tuple(ice.ignore_interfaces) + tuple(o.bridge for o in self.node.cfg.overlay) + ("ipt*",),
            ipv6=ice.ipv6,
            timers=self.timers, port_prediction=ice.port_prediction,
        )
        self.links[peer.node_id] = link
        self.by_link_id[link_id] = link
        await self.node.pool.open_link(spec)
        log.info("event=link_open overlay=%s peer=%s subject=%s controlling=%s", self.cfg.name, peer.node_id,
                 peer.subject, spec.controlling)
        return link

    async def _close_link(self, link: PeerLink, reason: str, *, notify: bool) -> None:
        self.links.pop(link.node_id, None)
        self.by_link_id.pop(link.link_id, None)
        await self._remove_port(link)
        link.state = "closed"
        try:
            await self.node.pool.close_link(link.link_id, reason, notify_peer=notify)
        except Exception as e:
            log.warning("event=link_close_failed link=%s error=%s", link.link_id, e)
        log.info("event=link_closed overlay=%s peer=%s reason=%s", self.cfg.name, link.node_id, reason)
        if self.topology is not None:
            self.topology.link_closed(link.node_id)

    async def _peer_message(self, node_id: str, type_: str, payload: dict) -> None:
        if type_ in TOPOLOGY_TYPES:
            await self.topology.on_message(node_id, type_, payload)
            return
        if type_ in SUMMARY_TYPES and self.summaries:
            await self.summaries.on_message(node_id, type_, payload)
            return
        if type_ not in LINK_TYPES:
            log.info("event=unknown_message overlay=%s peer=%s type=%s", self.cfg.name, node_id, type_)
            self._drop("unknown_type")
            return
        link = self.links.get(node_id)
        if link is None:
            if type_ == "link_close":
                return
            # a link the topology agreed to (the peer's worker may speak before our accept
            # arrived there); anything else is a stale attempt: the peer is told to drop it
            if not self.topology.knows(node_id) or not await self._open_member(node_id):
                self._drop("link_unwanted")
                await self.topology.drop_stale(node_id)
                return
            link = self.links[node_id]
        await self.node.pool.deliver(link.link_id, type_, payload)

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    # -- pool events (dispatched by the node by link id) ----------------------------------------
    async def on_pool_event(self, e) -> None:
        link = self.by_link_id.get(e.link_id)
        d = e.data
        if e.kind == "signal":
            if link:
                await self.signaling.send(link.node_id, d["type"], d["payload"])
        elif link is None:
            return
        elif e.kind == "up":
            link.path, link.local, link.remote = d.get("path"), d.get("local"), d.get("remote")
            await self._add_port(link)
            link.state = "up"
            link.up_since = time.monotonic()
            link.ups += 1
            log.info("event=link_up overlay=%s peer=%s path=%s local=%s remote=%s", self.cfg.name, link.node_id,
                     link.path, link.local, link.remote)
            self.topology.link_up(link.node_id)
        elif e.kind == "path":      # a relayed link moved to a direct path (make before break)
            link.path, link.local, link.remote = d.get("path"), d.get("local"), d.get("remote")
            log.info("event=link_path overlay=%s peer=%s path=%s local=%s remote=%s", self.cfg.name, link.node_id,
                     link.path, link.local, link.remote)
        elif e.kind in ("down", "closed"):
            await self._remove_port(link)
            link.state = "connecting"
            link.up_since = None
            link.last_reason = d.get("reason", e.kind)
            log.info("event=link_down overlay=%s peer=%s reason=%s", self.cfg.name, link.node_id, link.last_reason)
            self.topology.link_down(link.node_id)
        elif e.kind == "error":
            log.warning("event=link_error overlay=%s peer=%s error=%s", self.cfg.name, link.node_id, d.get("error"))

    async def _add_port(self, link: PeerLink) -> None:
        async with self._lock:
            if not link.port:
                await asyncio.to_thread(self.bridge.add_peer_port, link.tap)
                link.port = True
            if self.social:   # a friend's node: its frames translated to our view of addresses
                await self.switch.add_friend_port(link.tap, link.node_id, self.social.address_of(link.node_id))
            else:
                await self.switch.add_peer_port(link.tap, link.node_id)

    async def _remove_port(self, link: PeerLink) -> None:
        async with self._lock:
            if link.port:
                try:
                    if self.social:
                        await self.switch.remove_friend_port(link.tap)
                    else:
                        await self.switch.remove_peer_port(link.tap)
                except Exception as e:
                    log.warning("event=switch_remove_port_failed port=%s error=%s", link.tap, e)
                await asyncio.to_thread(self.bridge.remove_peer_port, link.tap)
                link.port = False

    # -- topology ---------------------------------------------------------------------------
    def _my_neighbours(self) -> list[str]:
        return sorted(n for n, l in self.links.items() if l.state == "up")

    async def _watch_traffic(self) -> None:
        """Bytes to each member (the switch app's unicast counters, by the owner of the
        destination MAC) feed the topology's on-demand links. Only in a structured overlay
        with on-demand links on: an all-to-all one has a link to everyone already."""
        params = self.topology.params
        if params.ondemand_threshold_bps <= 0:
            return
        last: dict[str, int] = {}
        while True:
            await asyncio.sleep(min(2.0, params.ondemand_window / 4))
            if not params.structured(len(self.topology.members())):
                last = {}
                continue
            try:
                now = await self.switch.owner_bytes()
            except Exception as e:
                log.debug("event=owner_bytes_failed overlay=%s error=%s", self.cfg.name, e)
                continue
            delta = {o: n - last.get(o, 0) if n >= last.get(o, 0) else n for o, n in now.items()}
            last = now
            self.traffic_bytes = now
            self.topology.traffic(delta)

    # -- status -----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        now = time.monotonic()
        sig = self.signaling
        peers = []
        roles = self.topology.policy.roles() if self.topology else {}
        for link in sorted(self.links.values(), key=lambda l: l.node_id):
            s = link.stats
            peers.append({
                "node_id": link.node_id, "subject": link.subject, "state": link.state,
                "path": link.path if link.state == "up" else None,
                "candidates": s.get("candidates"), "family": s.get("family"),
                "remote_addr": link.remote, "local_addr": link.local,
                "rtt_ms": s.get("rtt_ms"), "tx_frames": s.get("tx_frames", 0), "tx_bytes": s.get("tx_bytes", 0),
                "rx_frames": s.get("rx_frames", 0), "rx_bytes": s.get("rx_bytes", 0), "drops": s.get("drops", {}),
                "last_handshake_s": s.get("last_handshake_s"),
                "uptime_s": round(now - link.up_since, 1) if link.up_since else None,
                "port": link.tap if link.port else None, "ups": link.ups, "last_reason": link.last_reason,
                "role": roles.get(link.node_id),
            })
        if isinstance(self.topology, OverlayTopology) and sig is not None:   # reach, via, direct failures
            self.topology.annotate(peers, lambda n: getattr(sig.peer(n), "subject", None))
        return {
            "name": self.cfg.name, "kind": self.cfg.kind, "bridge": self.cfg.bridge,
            "address": self.cfg.address, "address6": self.cfg.address6,
            "signaling": self._signaling_snapshot(),
            "peers": peers,
            "guests": self.guests.snapshot(self.switch_ports) if self.guests else [],
            "switch": self.switch_counters,
            "topology": self.topology.snapshot() if self.topology else None,
            "drops": dict(self.drops),
            "dns": self.dns.status() if self.dns else None,
            "social": self.social.snapshot() if self.social else None,
            "summaries": self.summaries.status() if self.summaries else None,
        }

    def _signaling_snapshot(self) -> dict:
        """State for status: online, or which server is being tried and when the next attempt is."""
        st = self.signaling.status() if self.signaling else {}
        conn = st.get("connecting")
        state = self.sig_state
        if conn:
            nxt = f", next in {conn['next_in']:.0f}s" if conn.get("next_in") is not None else ""
            state = f"offline: connecting to {conn['server']} (attempt {conn['attempt']}{nxt})"
        return {"state": state, "server": st.get("server") or self.cfg.xmpp.where(),
                "servers": self.cfg.xmpp.where(), "drops": st.get("drops", {}),
                "room_repairs": st.get("room_repairs", 0), "last_error": st.get("last_error", "")}


def topology_params(cfg: OverlayConfig) -> TopologyParams:
    """The policy's parameters from ``[overlay.topology]``; a bad combination is one clear error."""
    t = cfg.topology
    try:
        return TopologyParams(all_to_all_max=t.all_to_all_max, successors=t.successors, long_links=t.long_links,
                              max_degree=min(t.max_degree, cfg.max_peers), ondemand_slots=t.ondemand_slots,
                              ondemand_threshold_bps=t.ondemand_threshold_bps, ondemand_window=t.ondemand_window,
                              ondemand_idle=t.ondemand_idle, max_new_links_per_min=t.max_new_links_per_min,
                              min_link_age=t.min_link_age, request_timeout=t.request_timeout,
                              retry_backoff=t.retry_backoff, cycle=t.cycle)
    except ValueError as e:
        raise IpopError(f"overlay {cfg.name}: [overlay.topology] {e} (max_peers {cfg.max_peers} caps max_degree)") from None


def make_signaling(cfg: OverlayConfig, me):
    """The overlay's signaling session (XMPP), built from the node config."""
    from ..signaling.config import SignalingConfig
    from ..signaling.session import SignalingSession
    scfg = SignalingConfig(jid=cfg.xmpp.jid, password=cfg.xmpp.secret(), server=cfg.xmpp.server,
                           port=cfg.xmpp.port, servers=cfg.xmpp.servers, ca_file=cfg.xmpp.ca_file, room=cfg.xmpp.room,
                           capabilities=dns_caps(cfg))
    return SignalingSession(me, scfg)
