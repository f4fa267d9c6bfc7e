"""Frame parsing and the few frames the app writes itself (ARP replies, neighbour
advertisements, MSS-clamped SYNs). Plain struct code: packet-ins are the app's hot
path and these few fields are all it needs. Pure functions, no os-ken.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_VLAN = (0x8100, 0x88A8)
ETH_ARP, ETH_IP, ETH_IP6 = 0x0806, 0x0800, 0x86DD
BROADCAST = b"\xff" * 6


class BadFrame(ValueError):
    """Too short or malformed: counted and dropped."""


@dataclass
class Frame:
    data: bytes
    dst: bytes
    src: bytes
    tags: list[int]  # VLAN ids, outermost first
    ethertype: int
    l3: int  # offset of the L3 header

    @property
    def untagged(self) -> bytes:
        """The frame without its VLAN tags."""
        return self.dst + self.src + struct.pack("!H", self.ethertype) + self.data[self.l3 :]


def parse(data: bytes) -> Frame:
    if len(data) < 14:
        raise BadFrame("short ethernet frame")
    off = 12
    tags: list[int] = []
    (et,) = struct.unpack_from("!H", data, off)
    while et in ETH_VLAN:
        if len(data) < off + 8:
            raise BadFrame("short vlan header")
        (tci,) = struct.unpack_from("!H", data, off + 2)
        tags.append(tci & 0x0FFF)
        off += 4
        (et,) = struct.unpack_from("!H", data, off)
        if len(tags) > 4:
            raise BadFrame("too many vlan tags")
    return Frame(data, data[0:6], data[6:12], tags, et, off + 2)


def mac_str(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def mac_bytes(s: str) -> bytes:
    return bytes(int(x, 16) for x in s.split(":"))


# -- ARP -------------------------------------------------------------------
@dataclass
class Arp:
    op: int
    sha: bytes
    spa: str
    tha: bytes
    tpa: str


def parse_arp(f: Frame) -> Arp | None:
    p = f.data[f.l3 : f.l3 + 28]
    if f.ethertype != ETH_ARP or len(p) < 28:
        return None
    htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", p)
    if htype != 1 or ptype != ETH_IP or hlen != 6 or plen != 4:
        return None
    return Arp(op, p[8:14], str(ipaddress.IPv4Address(p[14:18])), p[18:24], str(ipaddress.IPv4Address(p[24:28])))


def arp_reply(req: Arp, answer_mac: bytes) -> bytes:
    """Reply to ``req`` as if ``req.tpa`` (at ``answer_mac``) had answered."""
    eth = req.sha + answer_mac + struct.pack("!H", ETH_ARP)
    arp = struct.pack("!HHBBH", 1, ETH_IP, 6, 4, 2) + answer_mac + ipaddress.IPv4Address(req.tpa).packed
    arp += req.sha + ipaddress.IPv4Address(req.spa).packed
    return eth + arp


ETH_RARP = 0x8035


def rarp_announce(mac: bytes) -> bytes:
    """A broadcast RARP "request reverse" from ``mac``, as QEMU sends after a migration: a frame
    every host ignores whose only job is to be seen (and learned) by every switch."""
    arp = struct.pack("!HHBBH", 1, ETH_IP, 6, 4, 3) + mac + b"\0" * 4 + mac + b"\0" * 4
    frame = BROADCAST + mac + struct.pack("!H", ETH_RARP) + arp
    return frame + b"\0" * (60 - len(frame))


# -- IPv6 neighbour discovery ------------------------------------------------
ND_NS, ND_NA = 135, 136


@dataclass
class Nd:
    type: int
    src_ip: str
    dst_ip: str
    target: str
    lladdr: bytes | None  # source LL option (NS) or target LL option (NA)
    src_mac: bytes


def parse_nd(f: Frame) -> Nd | None:
    """NS/NA only (other ICMPv6 is carried, not inspected)."""
    if f.ethertype != ETH_IP6:
        return None
    p = f.data[f.l3 :]
    if len(p) < 40 + 24 or p[6] != 58:
        return None
    icmp = p[40:]
    if icmp[0] not in (ND_NS, ND_NA) or icmp[1] != 0:
        return None
    target = str(ipaddress.IPv6Address(icmp[8:24]))
    ll = None
    opts = icmp[24:]
    want = 1 if icmp[0] == ND_NS else 2
    while len(opts) >= 8:
        ot, ol = opts[0], opts[1] * 8
        if ol == 0:
            break
        if ot == want and ol >= 8:
            ll = bytes(opts[2:8])
        opts = opts[ol:]
    return Nd(icmp[0], str(ipaddress.IPv6Address(p[8:24])), str(ipaddress.IPv6Address(p[24:40])), target, ll, f.src)


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def neighbour_advert(ns: Nd, answer_mac: bytes) -> bytes:
    """Solicited NA for ``ns.target`` at ``answer_mac``, sent to the soliciting host."""
    src = ipaddress.IPv6Address(ns.target).packed
    dst = ipaddress.IPv6Address(ns.src_ip).packed
    body = struct.pack("!BBHI", ND_NA, 0, 0, 0x60000000) + src + struct.pack("!BB", 2, 1) + answer_mac  # S|O flags
    pseudo = src + dst + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", _csum(pseudo + body)) + body[4:]
    ip6 = struct.pack("!IHBB", 0x60000000, len(body), 58, 255) + src + dst
    dst_mac = ns.lladdr or ns.src_mac
    return dst_mac + answer_mac + struct.pack("!H", ETH_IP6) + ip6 + body


# -- TCP MSS clamping ----------------------------------------------------------
def clamp_mss(f: Frame, mss4: int, mss6: int) -> tuple[bytes, int] | None:
    """If ``f`` is a TCP SYN with an MSS option: (new untagged frame with the MSS at most the
    limit, old mss); the caller tells a clamp from a pass by comparing the old MSS.

    The TCP checksum is recomputed in full: a SYN from a host with checksum
    offload may carry only a partial (pseudo-header) checksum. Any malformed
    frame (lengths, options) gives None, never an exception: these are hosts' bytes.
    """
    b = bytearray(f.untagged)
    l3 = 14
    if f.ethertype == ETH_IP and len(b) >= l3 + 20:
        ihl = (b[l3] & 0x0F) * 4
        if b[l3 + 9] != 6 or ihl < 20:
            return None
        tot = struct.unpack_from("!H", b, l3 + 2)[0]
        if tot < ihl + 20:  # no room for a TCP header (a malformed length must not raise below)
            return None
        l4, end, limit = l3 + ihl, l3 + tot, mss4
        pseudo = bytes(b[l3 + 12 : l3 + 20]) + struct.pack("!BBH", 0, 6, tot - ihl)
    elif f.ethertype == ETH_IP6 and len(b) >= l3 + 40:
        if b[l3 + 6] != 6:  # extension headers before TCP: not clamped
            return None
        plen = struct.unpack_from("!H", b, l3 + 4)[0]
        l4, end, limit = l3 + 40, l3 + 40 + plen, mss6
        pseudo = bytes(b[l3 + 8 : l3 + 40]) + struct.pack("!I3xB", plen, 6)
    else:
        return None
    if limit <= 0 or end > len(b) or end - l4 < 20:
        return None
    flags = b[l4 + 13]
    if not flags & 0x02:
        return None
    doff = (b[l4 + 12] >> 4) * 4
    i, opt_end = l4 + 20, min(l4 + doff, end)
    while i < opt_end:
        kind = b[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= opt_end or b[i + 1] < 2:
            return None
        if kind == 2 and b[i + 1] == 4 and i + 4 <= opt_end:
            old = struct.unpack_from("!H", b, i + 2)[0]
            # an MSS already within the limit is kept, but the checksum is still made whole: the
            # frame goes on from the app, where a partial checksum would reach the peer as is
            struct.pack_into("!H", b, i + 2, min(old, limit))
            struct.pack_into("!H", b, l4 + 16, 0)
            struct.pack_into("!H", b, l4 + 16, _csum(pseudo + bytes(b[l4:end])))
            return bytes(b[:end]), old
        i += b[i + 1]
    return None
