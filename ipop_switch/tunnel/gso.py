"""TCP segmentation and coalescing for the batched datapath (virtio-net offloads).

A TAP opened with ``IFF_VNET_HDR`` and TSO offloads hands us TCP "super-frames" of
up to 64 KiB, each behind a 10-byte ``virtio_net_hdr``. We encrypt per MSS segment
(so a lost datagram loses one segment, not 64 KiB), and the receiver coalesces
contiguous segments back into one GSO frame for a single TAP write, which is the
largest single lever measured (868 -> 2033 Mbit/s for one TCP stream; it also cuts the
ACKs crossing the tunnel to about one per super-frame). Checksums are never
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


def _sum_words(b: bytes | bytearray | memoryview) -> int:
    """Ones' complement sum of big-endian 16-bit words, folded to 16 bits (odd tail padded).

    2^16 = 1 (mod 0xFFFF), so the sum of the words is the whole buffer read as one
    big integer modulo 0xFFFF: one C call instead of a loop over words."""
    if len(b) & 1:
        b = bytes(b) + b"\0"
    return int.from_bytes(b, "big") % 0xFFFF


def ipv4_header_checksum(hdr: bytes | bytearray | memoryview) -> int:
    """RFC 791 header checksum over ``hdr`` with its checksum field taken as zero."""
    s = _sum_words(hdr) + 0xFFFF - _H.unpack_from(hdr, 10)[0]
    return (~_fold(s)) & 0xFFFF


def pseudo_partial(ip_ver: int, ip: bytes | memoryview, tcp_len: int) -> int:
    """The non-inverted pseudo-header sum a NEEDS_CSUM frame carries in its TCP checksum field."""
    if ip_ver == 4:
        s = _sum_words(ip[12:20]) + 6 + tcp_len
    else:
        s = _sum_words(ip[8:40]) + 6 + tcp_len
    return _fold(s)


def complete_checksum(frame: bytearray, csum_start: int, csum_offset: int) -> None:
    """Do in software what NEEDS_CSUM asks of the device: the field holds the partial
    (pseudo-header) sum; store the complement of the sum from ``csum_start`` on.
    For the rare partial-checksum frame on the per-packet path."""
    s = _fold(_sum_words(memoryview(frame)[csum_start:]))
    c = (~s) & 0xFFFF
    if c == 0 and csum_offset == 6:
        c = 0xFFFF                  # UDP: 0 means "no checksum"
    _H.pack_into(frame, csum_start + csum_offset, c)


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
    only; every segment is NEEDS_CSUM with its own pseudo-header partial sum. Header
    sums are computed once and adjusted per segment (this runs per MSS on the hot path).
    """
    lay = Layout(frame)
    if gso_size <= 0:
        raise OffloadError("bad_gso_size")
    hdr_end = lay.payload_off
    payload = memoryview(frame)[hdr_end:]
    plen = len(payload)
    n = max(1, -(-plen // gso_size))
    if n > 1024:
        raise OffloadError("too_many_segments")
    template = bytearray(frame[:hdr_end])
    t, ip, v4 = lay.tcp_off, lay.ip_off, lay.ver == 4
    seq0 = _I.unpack_from(template, t + 4)[0]
    flags0 = template[t + 13]
    tcp_hlen = lay.tcp_len
    if v4:
        ip_id0 = _H.unpack_from(template, ip + 4)[0]
        # header sum without total length, id and checksum: those are added per segment
        for o in (2, 4, 10):
            _H.pack_into(template, ip + o, 0)
        base = _sum_words(template[ip:ip + lay.ip_len])
        addr = _sum_words(template[ip + 12:ip + 20])
    else:
        addr = _sum_words(template[ip + 8:ip + 40])
    mid_flags = flags0 & ~(TCP_FIN | TCP_PSH | TCP_CWR)
    pack_seq, pack_h = _I.pack_into, _H.pack_into
    out = []
    for i in range(n):
        chunk = payload[i * gso_size:(i + 1) * gso_size]
        seg = template + chunk
        tcp_len = tcp_hlen + len(chunk)
        pack_seq(seg, t + 4, (seq0 + i * gso_size) & 0xFFFFFFFF)
        if n > 1:
            f = mid_flags
            if i == 0:
                f |= flags0 & TCP_CWR
            if i == n - 1:
                f |= flags0 & (TCP_FIN | TCP_PSH)
            seg[t + 13] = f
        if v4:
            total = lay.ip_len + tcp_len
            ip_id = (ip_id0 + i) & 0xFFFF
            pack_h(seg, ip + 2, total)
            pack_h(seg, ip + 4, ip_id)
            pack_h(seg, ip + 10, (~_fold(base + total + ip_id)) & 0xFFFF)
        else:
            pack_h(seg, ip + 4, tcp_len)
        pack_h(seg, t + 16, _fold(addr + 6 + tcp_len))
        out.append(seg)
    return out


_MERGE_STOP = TCP_SYN | TCP_RST | TCP_URG
_PSH_FIN = TCP_PSH | TCP_FIN
_KEY_FLAGS_MASK = ~(TCP_PSH | TCP_FIN | TCP_CWR) & 0xFF
_JOIN_FLAGS_MASK = _KEY_FLAGS_MASK | TCP_CWR    # a joining segment: the run's key flags, no CWR


_RUN_STRUCTS: dict[tuple[bool, int, int], tuple] = {}


def _run_structs(v4: bool, t: int, po: int) -> tuple:
    """``(key, variable)`` unpackers for a TCP header layout (TCP header at ``t``, payload at
    ``po``): the key is every byte two segments of one run must share (Ethernet, IP but
    length/id/checksum, ports, ack, data offset, window, urgent pointer and options); the
    variable part is (IP length field, seq, flags). Cached: a flow's layout repeats."""
    k = (v4, t, po)
    r = _RUN_STRUCTS.get(k)
    if r is None:
        tail = f"{po - t - 18}s"
        if v4:      # skip total length, id, checksum; the TCP seq, flags, checksum
            key = struct.Struct(f"!16s4x4s2x{t + 4 - 26}s4x5sx2s2x{tail}")
            var = struct.Struct(f"!16xH{t + 4 - 18}xI5xB")
        else:       # skip the payload length
            key = struct.Struct(f"!18s2x{t + 4 - 20}s4x5sx2s2x{tail}")
            var = struct.Struct(f"!18xH{t + 4 - 20}xI5xB")
        if len(_RUN_STRUCTS) > 64:
            _RUN_STRUCTS.clear()
        r = _RUN_STRUCTS[k] = (key.unpack_from, var.unpack_from)
    return r


class Coalescer:
    """Merges runs of contiguous TCP segments of one receive burst into GSO frames.

    ``add_segment`` takes a TCP segment whose checksum field holds the pseudo-header
    partial sum (NEEDS_CSUM); ``add_frame`` any other frame with its ready vnet header
    (it ends the current run: nothing is reordered). ``flush`` returns the
    ``(vnet_header, frame)`` pairs to write, in order. A segment that cannot join a
    run (another flow, a gap, a SYN/RST/URG, a short one before the end, 64 KiB reached)
    starts a new one, so a lost segment only splits a run: it never loses another.
    Parsing is inlined (this runs once per received MSS).

    ``fast``: the C receive loop (accel ``FastRx``), which coalesces into ``out`` too. At
    most one of the two has a run open: each ends the other's before it adds anything,
    so frames stay in arrival order.
    """

    __slots__ = ("max_len", "out", "run", "key", "next_seq", "mss", "room", "t", "po", "v4", "last_flags",
                 "open", "iadj", "kflags", "kunpack", "vunpack", "fast")

    def __init__(self, max_len: int = 65535, fast=None) -> None:
        self.max_len = max_len
        self.fast = fast
        self.out: list[tuple[bytes, bytes | bytearray]] = []
        self.run: list[bytes | bytearray] = []
        self.key = b""
        self.next_seq = self.mss = self.room = self.t = self.po = self.last_flags = self.iadj = self.kflags = 0
        self.open = False           # the run may grow: its last segment is full-size, without PSH/FIN
        self.v4 = True
        self.kunpack = self.vunpack = None

    def __len__(self) -> int:
        return len(self.out) + len(self.run) + (self.fast is not None and self.fast.has_run)

    def add_frame(self, vnet: bytes, frame: bytes | bytearray) -> None:
        self._close()
        self.out.append((vnet, frame))

    def _close(self) -> None:
        """End the open run, ours or the C loop's, before something else is added."""
        if self.run:
            self._end_run()
        elif self.fast is not None:
            self.fast.end_run(self.out)

    def add_segment(self, seg: bytes | bytearray, csum_start: int = -1) -> None:
        """Queue one TCP segment; OffloadError (nothing queued) if it is not one, or if
        ``csum_start`` (when given) is not where its TCP header starts."""
        n = len(seg)
        if self.open and n > self.po and (csum_start < 0 or csum_start == self.t):
            # Fast path, the next segment of the current run: the run's layout unpacks this
            # one's key (which holds ethertype, IHL, protocol and data offset, so an equal
            # key means an equal layout) and its variable fields in two calls. The flags
            # test also refuses SYN/RST/URG and CWR (``kflags`` has none of them).
            iplen, seq, flags = self.vunpack(seg)
            plen = n - self.po
            if (seq == self.next_seq and plen <= self.mss and iplen == n - self.iadj
                    and flags & _JOIN_FLAGS_MASK == self.kflags and plen <= self.room
                    and self.kunpack(seg) == self.key):
                self.run.append(seg)
                self.room -= plen
                self.open = plen == self.mss and not flags & _PSH_FIN
                self.last_flags = flags
                self.next_seq = (seq + plen) & 0xFFFFFFFF
                return
        if n < ETH_LEN + 40:
            raise OffloadError("short_frame")
        et = seg[12] << 8 | seg[13]
        if et == ETH_IPV4:
            vihl = seg[14]
            ihl = (vihl & 0xF) * 4
            if vihl >> 4 != 4 or ihl < 20:
                raise OffloadError("bad_ip")
            if seg[23] != 6:
                raise OffloadError("not_tcp")
            t = ETH_LEN + ihl
            v4 = True
            ip_ok = (seg[16] << 8 | seg[17]) == n - ETH_LEN
        elif et == ETH_IPV6:
            if seg[20] != 6:
                raise OffloadError("not_tcp")
            t = ETH_LEN + 40
            v4 = False
            ip_ok = (seg[18] << 8 | seg[19]) == n - t
        else:
            raise OffloadError("not_ip")
        if n < t + 20:
            raise OffloadError("short_frame")
        thl = (seg[t + 12] >> 4) * 4
        po = t + thl
        if thl < 20 or n < po:
            raise OffloadError("bad_tcp")
        if csum_start >= 0 and csum_start != t:
            raise OffloadError("bad_csum_offsets")
        plen = n - po
        flags = seg[t + 13]
        if plen == 0 or flags & _MERGE_STOP or not ip_ok:
            self._close()
            self.out.append((VNET.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, t, 16), seg))
            return
        seq = seg[t + 4] << 24 | seg[t + 5] << 16 | seg[t + 6] << 8 | seg[t + 7]
        kunpack, vunpack = _run_structs(v4, t, po)
        key = kunpack(seg)
        if (self.open and key == self.key and seq == self.next_seq and plen <= self.mss
                and flags & _JOIN_FLAGS_MASK == self.kflags and plen <= self.room):
            self.run.append(seg)
            self.room -= plen
        else:
            self._close()
            self.run.append(seg)
            self.key, self.mss, self.t, self.po, self.v4 = key, plen, t, po, v4
            self.room = self.max_len - (po - ETH_LEN + plen)
            self.iadj = ETH_LEN if v4 else t
            self.kflags = flags & _KEY_FLAGS_MASK
            self.kunpack, self.vunpack = kunpack, vunpack
        self.open = plen == self.mss and not flags & _PSH_FIN
        self.last_flags = flags
        self.next_seq = (seq + plen) & 0xFFFFFFFF

    def add_continuation(self, seg: bytes | bytearray) -> bool:
        """Append ``seg`` to the open run without comparing its headers: the caller knows
        (the sender marked it, FMT_CONT, with the next counter of the same session) that it
        is the next segment of the super-frame the run's last segment came from. Its
        headers are then those of the run but seq, lengths, ids and checksums, which the
        merged frame recomputes or drops. False (nothing queued) when the run cannot take
        it; the caller then parses it like any segment."""
        plen = len(seg) - self.po
        if not self.open or plen <= 0 or plen > self.mss or plen > self.room:
            return False
        flags = seg[self.t + 13]
        if flags & _JOIN_FLAGS_MASK != self.kflags:
            return False
        self.run.append(seg)
        self.room -= plen
        self.open = plen == self.mss and not flags & _PSH_FIN
        self.last_flags = flags
        self.next_seq = (self.next_seq + plen) & 0xFFFFFFFF
        return True

    def end_run(self) -> None:
        """Close the open run (the C loop is about to add to ``out``)."""
        if self.run:
            self._end_run()

    def _end_run(self) -> None:
        run, t, po = self.run, self.t, self.po
        self.run = []
        self.open = False
        if len(run) == 1:
            self.out.append((VNET.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, t, 16), run[0]))
            return
        first = run[0]
        frame = bytearray().join([first] + [memoryview(x)[po:] for x in run[1:]])
        frame[t + 13] = first[t + 13] | (self.last_flags & _PSH_FIN)
        ip = ETH_LEN
        if self.v4:
            _H.pack_into(frame, ip + 2, len(frame) - ETH_LEN)
            _H.pack_into(frame, ip + 10, ipv4_header_checksum(memoryview(frame)[ip:t]))
            gso_t = GSO_TCPV4
            addr = _sum_words(memoryview(frame)[ip + 12:ip + 20])
        else:
            _H.pack_into(frame, ip + 4, len(frame) - t)
            gso_t = GSO_TCPV6
            addr = _sum_words(memoryview(frame)[ip + 8:ip + 40])
        _H.pack_into(frame, t + 16, _fold(addr + 6 + len(frame) - t))
        self.out.append((VNET.pack(F_NEEDS_CSUM, gso_t, po, self.mss, t, 16), frame))

    def flush(self) -> list[tuple[bytes, bytes | bytearray]]:
        self._close()
        out = self.out[:]           # the list itself stays: the receive loop holds it
        self.out.clear()
        return out


def coalesce(segments: list[bytes | bytearray], *, max_len: int = 65535) -> list[tuple[bytes, bytes]]:
    """Merge runs of contiguous segments of one flow into GSO frames for one TAP write each.

    Returns ``(vnet_header, frame)`` pairs in order; anything that is not a TCP
    segment passes through with an empty offload header. See ``Coalescer``.
    """
    c = Coalescer(max_len)
    for seg in segments:
        try:
            c.add_segment(seg)
        except OffloadError:
            c.add_frame(NO_VNET, seg)
    return [(v, bytes(f)) for v, f in c.flush()]


def _ip_total_ok(seg: bytes | bytearray, lay: Layout) -> bool:
    """The IP length must match the frame exactly (no Ethernet padding or truncation)."""
    if lay.ver == 4:
        return _H.unpack_from(seg, lay.ip_off + 2)[0] == len(seg) - ETH_LEN
    return _H.unpack_from(seg, lay.ip_off + 4)[0] == len(seg) - ETH_LEN - 40


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
