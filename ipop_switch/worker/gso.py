"""TCP segmentation and coalescing for the batched datapath (virtio-net offloads).

A TAP opened with ``IFF_VNET_HDR`` and TSO offloads hands us TCP "super-frames" of
up to 64 KiB, each behind a 10-byte ``virtio_net_hdr``. We encrypt per MSS segment
(so a lost datagram loses one segment, not 64 KiB), and the receiver coalesces
contiguous segments back into one GSO frame for a single TAP write, which is the
largest single lever measured (shared/datapath-facts.md). Checksums are never
computed for TCP payloads: segments keep ``NEEDS_CSUM`` end to end (the AEAD
covers integrity) and their checksum field carries the pseudo-header partial sum
for their own length, exactly what the kernel expects with ``NEEDS_CSUM``.

Offload headers that come from a peer are input: ``check_vnet`` refuses anything
a TAP write could misinterpret, with a reason the caller counts.
"""

from __future__ import annotations

import struct

VNET = struct.Struct("<BBHHHH")        # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_LEN = VNET.size                   # 10
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6 = 0, 1, 3, 4
GSO_ECN = 0x80
ETH_LEN = 14
ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR = 1, 2, 4, 8, 16, 32, 64, 128
MAX_GSO_FRAME = 65535 + ETH_LEN
NO_VNET = VNET.pack(0, GSO_NONE, 0, 0, 0, 0)

_H = struct.Struct("!H")
_I = struct.Struct("!I")


class OffloadError(ValueError):
    """A frame or offload header that must not reach a TAP; ``reason`` is the drop counter's name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _sum_words(b: bytes | memoryview) -> int:
    s = 0
    for (w,) in struct.iter_unpack("!H", b):
        s += w
    return s


def ipv4_header_checksum(hdr: bytes | bytearray | memoryview) -> int:
    """RFC 791 header checksum over ``hdr`` with its checksum field taken as zero."""
    h = bytearray(hdr)
    h[10:12] = b"\0\0"
    return (~_fold(_sum_words(h))) & 0xFFFF


def pseudo_partial(ip_ver: int, ip: bytes | memoryview, tcp_len: int) -> int:
    """The non-inverted pseudo-header sum a NEEDS_CSUM frame carries in its TCP checksum field."""
    if ip_ver == 4:
        s = _sum_words(ip[12:20]) + 6 + tcp_len
    else:
        s = _sum_words(ip[8:40]) + 6 + tcp_len
    return _fold(s)


class Layout:
    """Offsets of a TCP/IP frame behind an Ethernet header (no VLAN, no IPv6 extension headers)."""

    __slots__ = ("ver", "ip_off", "ip_len", "tcp_off", "tcp_len", "payload_off")

    def __init__(self, frame: bytes | memoryview) -> None:
        if len(frame) < ETH_LEN + 20:
            raise OffloadError("short_frame")
        ethertype = _H.unpack_from(frame, 12)[0]
        self.ip_off = ETH_LEN
        if ethertype == ETH_IPV4:
            self.ver = 4
            vihl = frame[ETH_LEN]
            if vihl >> 4 != 4:
                raise OffloadError("bad_ip")
            self.ip_len = (vihl & 0xF) * 4
            if self.ip_len < 20 or frame[ETH_LEN + 9] != 6:
                raise OffloadError("not_tcp")
        elif ethertype == ETH_IPV6:
            self.ver = 6
            self.ip_len = 40
            if len(frame) < ETH_LEN + 40 or frame[ETH_LEN + 6] != 6:
                raise OffloadError("not_tcp")  # extension headers are not offloaded here
        else:
            raise OffloadError("not_ip")
        self.tcp_off = ETH_LEN + self.ip_len
        if len(frame) < self.tcp_off + 20:
            raise OffloadError("short_frame")
        self.tcp_len = (frame[self.tcp_off + 12] >> 4) * 4
        if self.tcp_len < 20 or len(frame) < self.tcp_off + self.tcp_len:
            raise OffloadError("bad_tcp")
        self.payload_off = self.tcp_off + self.tcp_len


def segment(frame: bytes | memoryview, gso_size: int) -> list[bytearray]:
    """Split a TCP super-frame into segments of ``gso_size`` payload bytes.

    seq += i*mss, IPv4 id += i, CWR on the first segment only, FIN/PSH on the last
    only; every segment is NEEDS_CSUM with its own pseudo-header partial sum.
    """
    lay = Layout(frame)
    if gso_size <= 0:
        raise OffloadError("bad_gso_size")
    hdr_end = lay.payload_off
    payload = memoryview(frame)[hdr_end:]
    n = max(1, -(-len(payload) // gso_size))
    if n > 1024:
        raise OffloadError("too_many_segments")
    template = bytearray(frame[:hdr_end])
    t, ip = lay.tcp_off, lay.ip_off
    seq0 = _I.unpack_from(template, t + 4)[0]
    flags0 = template[t + 13]
    ip_id0 = _H.unpack_from(template, ip + 4)[0] if lay.ver == 4 else 0
    out = []
    for i in range(n):
        chunk = payload[i * gso_size:(i + 1) * gso_size]
        seg = bytearray(template)
        seg += chunk
        tcp_len = lay.tcp_len + len(chunk)
        _I.pack_into(seg, t + 4, (seq0 + i * gso_size) & 0xFFFFFFFF)
        f = flags0
        if i > 0:
            f &= ~TCP_CWR
        if i < n - 1:
            f &= ~(TCP_FIN | TCP_PSH)
        seg[t + 13] = f
        if lay.ver == 4:
            _H.pack_into(seg, ip + 2, lay.ip_len + tcp_len)
            _H.pack_into(seg, ip + 4, (ip_id0 + i) & 0xFFFF)
            _H.pack_into(seg, ip + 10, 0)
            _H.pack_into(seg, ip + 10, ipv4_header_checksum(seg[ip:ip + lay.ip_len]))
        else:
            _H.pack_into(seg, ip + 4, tcp_len)
        _H.pack_into(seg, t + 16, pseudo_partial(lay.ver, seg[ip:ip + lay.ip_len], tcp_len))
        out.append(seg)
    return out


def _flow_key(seg: bytes | bytearray, lay: Layout) -> bytes:
    """Everything that must match for two segments to be merged: Ethernet, IP (but lengths,
    id and checksum), ports, ack, window, options; flags but PSH/FIN/CWR."""
    ip, t = lay.ip_off, lay.tcp_off
    if lay.ver == 4:
        iph = bytes(seg[ip:ip + 2]) + bytes(seg[ip + 6:ip + 10]) + bytes(seg[ip + 12:ip + lay.ip_len])
    else:
        iph = bytes(seg[ip:ip + 4]) + bytes(seg[ip + 6:ip + 40])
    tcph = bytes(seg[t:t + 4]) + bytes(seg[t + 8:t + 13]) + bytes([seg[t + 13] & ~(TCP_PSH | TCP_FIN | TCP_CWR) & 0xFF]) \
        + bytes(seg[t + 14:t + 16]) + bytes(seg[t + 18:lay.payload_off])
    return bytes(seg[:ETH_LEN]) + iph + tcph


def coalesce(segments: list[bytes | bytearray], *, max_len: int = 65535) -> list[tuple[bytes, bytes]]:
    """Merge runs of contiguous segments of one flow into GSO frames for one TAP write each.

    Returns ``(vnet_header, frame)`` pairs in order. A segment that cannot join a run
    (another flow, a gap, a SYN/RST/URG, a short one before the end) starts a new one;
    nothing is reordered or lost.
    """
    out: list[tuple[bytes, bytes]] = []
    run: list[bytes | bytearray] = []
    run_key = b""
    run_lay: Layout | None = None
    next_seq = 0
    mss = 0
    total = 0

    def flush() -> None:
        nonlocal run
        if run:
            out.append(_merge(run, run_lay, mss))  # type: ignore[arg-type]
        run = []

    for seg in segments:
        try:
            lay = Layout(seg)
        except OffloadError:
            flush()
            out.append((NO_VNET, bytes(seg)))
            continue
        t = lay.tcp_off
        plen = len(seg) - lay.payload_off
        flags = seg[t + 13]
        mergeable = plen > 0 and not flags & (TCP_SYN | TCP_RST | TCP_URG) and _ip_total_ok(seg, lay)
        if not mergeable:
            flush()
            out.append(_single(seg, lay))
            continue
        seq = _I.unpack_from(seg, t + 4)[0]
        key = _flow_key(seg, lay)
        joins = (
            run and key == run_key and seq == next_seq and plen <= mss
            and not (run[-1][run_lay.tcp_off + 13] & (TCP_PSH | TCP_FIN))  # type: ignore[union-attr]
            and len(run[-1]) - run_lay.payload_off == mss                   # type: ignore[union-attr]
            and total + plen <= max_len
            and not flags & TCP_CWR
        )
        if not joins:
            flush()
            run_key, run_lay, mss, total = key, lay, plen, lay.payload_off - ETH_LEN
        run.append(seg)
        total += plen
        next_seq = (seq + plen) & 0xFFFFFFFF
    flush()
    return out


def _ip_total_ok(seg: bytes | bytearray, lay: Layout) -> bool:
    """The IP length must match the frame exactly (no Ethernet padding or truncation)."""
    if lay.ver == 4:
        return _H.unpack_from(seg, lay.ip_off + 2)[0] == len(seg) - ETH_LEN
    return _H.unpack_from(seg, lay.ip_off + 4)[0] == len(seg) - ETH_LEN - 40


def _single(seg: bytes | bytearray, lay: Layout) -> tuple[bytes, bytes]:
    """One segment as it is: NEEDS_CSUM with its own partial sum (set by the sender)."""
    return VNET.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, lay.tcp_off, 16), bytes(seg)


def _merge(run: list[bytes | bytearray], lay: Layout, mss: int) -> tuple[bytes, bytes]:
    if len(run) == 1:
        return _single(run[0], lay)
    first, last = run[0], run[-1]
    hdr = bytearray(first[:lay.payload_off])
    po = lay.payload_off
    frame = hdr + b"".join(memoryview(s)[po:] for s in run)
    t, ip = lay.tcp_off, lay.ip_off
    frame[t + 13] = first[t + 13] | (last[t + 13] & (TCP_PSH | TCP_FIN))
    tcp_len = len(frame) - t
    if lay.ver == 4:
        _H.pack_into(frame, ip + 2, len(frame) - ETH_LEN)
        _H.pack_into(frame, ip + 10, ipv4_header_checksum(frame[ip:ip + lay.ip_len]))
        gso = GSO_TCPV4
    else:
        _H.pack_into(frame, ip + 4, len(frame) - ETH_LEN - 40)
        gso = GSO_TCPV6
    _H.pack_into(frame, t + 16, pseudo_partial(lay.ver, frame[ip:ip + lay.ip_len], tcp_len))
    return VNET.pack(F_NEEDS_CSUM, gso, po, mss, t, 16), bytes(frame)


def check_vnet(vnet: bytes | memoryview, frame: bytes | memoryview) -> None:
    """Refuse an offload header (from a peer) that does not describe ``frame`` sanely."""
    if len(vnet) != VNET_LEN:
        raise OffloadError("bad_vnet_len")
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET.unpack(vnet)
    if flags & ~(F_NEEDS_CSUM | F_DATA_VALID):
        raise OffloadError("bad_vnet_flags")
    if len(frame) > MAX_GSO_FRAME or len(frame) < ETH_LEN:
        raise OffloadError("bad_frame_len")
    if flags & F_NEEDS_CSUM:
        if csum_start < ETH_LEN or csum_offset not in (6, 16) or csum_start + csum_offset + 2 > len(frame):
            raise OffloadError("bad_csum_offsets")
    g = gso_type & ~GSO_ECN
    if g == GSO_NONE:
        if gso_size or len(frame) > 9216 + ETH_LEN:
            raise OffloadError("bad_gso")
        return
    if g not in (GSO_TCPV4, GSO_TCPV6) or not flags & F_NEEDS_CSUM:
        raise OffloadError("bad_gso_type")
    lay = Layout(frame)
    if (g == GSO_TCPV4) != (lay.ver == 4):
        raise OffloadError("gso_type_mismatch")
    if hdr_len != lay.payload_off or csum_start != lay.tcp_off or csum_offset != 16:
        raise OffloadError("bad_gso_offsets")
    if not 1 <= gso_size <= 65535 - hdr_len or len(frame) - hdr_len <= gso_size:
        raise OffloadError("bad_gso_size")
    if not _ip_total_ok(frame, lay):
        raise OffloadError("bad_ip_len")
