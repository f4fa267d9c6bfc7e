"""One overlay's DNS names, joined to the agent: what this node announces about itself
(its name, overlay addresses and configured guests, in its signed signaling announce), and
the responder (``naming/dns.py``) fed with a name table built from this node and the
members signaling verified (their certificates' common names and announced addresses).

The overlay calls three things: ``dns_caps`` (the announce), ``start_dns`` (None when
``[overlay.dns]`` is off) and ``OverlayDns.stop``/``status``.

A social overlay (docs/social.md) has no shared zone: its responder answers this node's view,
``<node>.<friend>.<social suffix>`` -> the address this node assigned (what ``friends hosts``
prints), and listens on loopback only: on the overlay address a friend could ask it for the
names of our other friends.
"""

from __future__ import annotations

import ipaddress
import logging
import time

from ..config import OverlayConfig, dns_loopback
from ..errors import IpopError
from ..naming.dns import DnsResponder
from ..naming.names import Member, NameTable, caps_of, dns_label, member_from_caps

log = logging.getLogger("ipop_switch.agent")

TABLE_MAX_AGE = 1.0     # seconds a built name table serves queries before it is rebuilt


def dns_caps(cfg: OverlayConfig) -> dict:
    """What this node announces for the others' name tables (always, DNS on or off here:
    a node's name must resolve on the nodes that do serve DNS)."""
    return caps_of(cfg.dns.name, cfg.address, cfg.address6, [(a.name, a.addresses) for a in cfg.attach])


def listen_addresses(cfg: OverlayConfig) -> list[tuple[str, int]]:
    """[overlay.dns] listen words made addresses: overlay, overlay6, loopback, or literal IPs
    (a social overlay skips 'overlay': see the module's docstring)."""
    out = []
    for x in cfg.dns.listen:
        if x == "overlay" and cfg.kind == "social":
            log.info("event=dns_social_no_overlay_listen overlay=%s reason=\"friends would see our friends' names\"",
                     cfg.name)
            continue
        if x == "overlay":
            host = str(ipaddress.ip_interface(cfg.address).ip)
        elif x == "overlay6":
            if not cfg.address6:
                raise IpopError(f"overlay {cfg.name}: dns.listen names 'overlay6' but the overlay has no address6")
            host = str(ipaddress.ip_interface(cfg.address6).ip)
        elif x == "loopback":
            host = cfg.dns.loopback or dns_loopback(cfg.name)
        else:
            host = x
        out.append((host, cfg.dns.port))
    if not out:   # a social overlay's default listen without 'overlay': loopback still
        out.append((cfg.dns.loopback or dns_loopback(cfg.name), cfg.dns.port))
    return out


def social_table(zone: str, names: list[tuple[str, str]]) -> NameTable:
    """A social overlay's table: these (host name, IPv4 address) pairs, the first claim of a
    name kept (this node's own name is first), names outside ``zone`` left out."""
    tab = NameTable(zone, [])
    for name, addr in names:
        name = name.rstrip(".").lower()
        if not tab.in_zone(name) or name == tab.zone:
            tab.ignored += 1
        elif name in tab.names:
            tab.conflicts.append(name)
        else:
            tab.names[name] = ([str(ipaddress.IPv4Address(addr))], [])
    return tab


class OverlayDns:
    """The responder of one overlay and the table it answers from."""

    def __init__(self, overlay) -> None:
        self.ov = overlay
        cfg: OverlayConfig = overlay.cfg
        self.zone = cfg.social.suffix if getattr(overlay, "social", None) else f"{cfg.name}.{cfg.dns.suffix}"
        self.networks = [ipaddress.ip_interface(cfg.address).network]
        if cfg.address6:
            self.networks.append(ipaddress.ip_interface(cfg.address6).network)
        self._table: NameTable | None = None
        self._built = 0.0
        self.responder = DnsResponder(self.table, listen=listen_addresses(cfg), forward=cfg.dns.forward_addrs(),
                                      ttl=cfg.dns.ttl)

    def members(self) -> list[Member]:
        ov, cfg = self.ov, self.ov.cfg
        guests = []
        if ov.guests is not None:
            guests = [(dns_label(g.spec.name), tuple(g.spec.addresses)) for g in ov.guests.ports.guests.values()]
        own = Member(ov.node_id, cfg.dns.name or dns_label(ov.me.own.common_name),
                     (str(ipaddress.ip_interface(cfg.address).ip),),
                     (str(ipaddress.ip_interface(cfg.address6).ip),) if cfg.address6 else (),
                     tuple((g, tuple(str(ipaddress.ip_interface(a).ip) for a in addrs)) for g, addrs in guests if g))
        out = [own]
        if ov.signaling is not None:
            for nid, rec in ov.signaling.peer_records().items():
                out.append(member_from_caps(nid, rec.peer.common_name, rec.caps))
        return out

    def table(self) -> NameTable:
        now = time.monotonic()
        if self._table is None or now - self._built > TABLE_MAX_AGE:
            if getattr(self.ov, "social", None):
                self._table = social_table(self.zone, self.ov.social.names())
            else:
                self._table = NameTable(self.zone, self.members(), networks=self.networks, trusted=self.ov.node_id)
            self._built = now
        return self._table

    async def start(self) -> None:
        await self.responder.start()
        log.info("event=dns_up overlay=%s zone=%s listen=%s forward=%s", self.ov.cfg.name, self.zone,
                 ",".join(f"{h}:{p}" for h, p in self.responder.listen), ",".join(self.ov.cfg.dns.forward) or "-")

    async def stop(self) -> None:
        await self.responder.stop()

    def status(self) -> dict:
        return self.responder.status()


async def start_dns(overlay) -> OverlayDns | None:
    """The overlay's responder, started; None when [overlay.dns] is not enabled."""
    if not overlay.cfg.dns.enable:
        return None
    d = OverlayDns(overlay)
    await d.start()
    return d
