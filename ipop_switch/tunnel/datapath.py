"""The per-frame hot path: TAP -> AEAD -> UDP and UDP -> AEAD -> TAP, batched where it can be.

Two modes, chosen per link attempt from what both ends support (docs/tunnel.md, "Data
packets" and "Offload negotiation"):

- **batched** (both ends announced ``offload: 1``): the TAP runs with TSO, so a read is
  often a 64 KiB TCP super-frame; it is cut into MSS segments (``gso.segment``), each
  sealed as its own data packet (a lost datagram loses one segment) carrying the
  offload format in the authenticated header, and sent with one UDP GSO ``sendmsg``
  per group on a direct path. The receiver queues the segments of one receive burst
  and writes runs of contiguous ones as one GSO frame (``gso.Coalescer``), the largest
  lever measured (shared/datapath-facts.md). Nothing TCP needs no batching: other
  frames pass one by one, in order.
- **per packet** (the peer is older, the bridge has no TSO, the kernel has no vnet
  header): the TAP hands over complete, segmented frames and each is sealed alone.

The per-segment loops of the batched mode (seal every segment of a super-frame; open
and coalesce the segments of a receive burst) run in C when the extension is built
(``accel``, ``_fastpath.c``: same wire bytes, same TAP writes, tested one against the
other); everything else, and both loops when it is not built, is the Python below.

Every offload header that comes from the peer is checked by ``gso.check_vnet`` (or
the coalescer's parser) before a TAP write; refusals are counted drops. Everything
runs in the pool process's event loop (uvloop): the TAP is read with ``add_reader``,
up to ``TAP_BURST`` frames per wake-up; datagrams arrive through the ICE socket's
protocol (a hook installed by the link worker). Nothing here raises on bad input.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections import Counter
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import accel, batch_io, codec, gso

TAP_BURST = 64
ZERO4 = b"\0\0\0\0"
TAP_READ = 65536 + gso.VNET_LEN + 64        # a 64 KiB IP packet + Ethernet (+ VLAN) + vnet header
DATA_OVERHEAD = 32                          # data packet header (16) + GCM tag (16)
_HDR = struct.Struct("!8sQ")                # data header: type, format, csum_start, index | counter
_Q = struct.Struct("!Q")
_I = struct.Struct("!I")
_H = struct.Struct("!H")
_U16 = struct.Struct("=H")
_RX_HDR = struct.Struct("!BBH4sQ")          # data header: type, format, csum_start, receiver index (LE), counter
_NONCE = struct.Struct("!4xQ")              # AEAD nonce: 4 zero bytes, the counter

# Data format (header byte 1, inside the AEAD's AAD; docs/tunnel.md "Data packets").
# 0: a complete frame (format v1). With FMT_CSUM the frame has a partial checksum
# (NEEDS_CSUM): bytes 2-3 hold csum_start (big-endian), the checksum field is at
# csum_start + 16 with FMT_TCP (a TCP segment the receiver may coalesce), else + 6 (UDP).
# FMT_CONT (only with CSUM|TCP, only to a peer that announced "cont"): the next segment of
# the super-frame the previous counter came from; the receiver may append it to the open
# run without comparing headers.
FMT_CSUM = 0x01
FMT_TCP = 0x02
FMT_CONT = 0x04
FMT_KNOWN = FMT_CSUM | FMT_TCP | FMT_CONT
_FMT_SEG = FMT_CSUM | FMT_TCP                # a TCP segment: the hot case
_FMT_CONT_SEG = _FMT_SEG | FMT_CONT          # ... continuing the previous one's super-frame
OFFLOAD_VERSION = 1                          # the "offload" hint both ends must announce

Sender = Callable[[bytes], None]


_HDR_STRUCTS: dict[str, struct.Struct] = {}


def _hdr_struct(fmt: str) -> struct.Struct:
    """A cached ``struct.Struct`` (a flow's header layout repeats for every super-frame)."""
    st = _HDR_STRUCTS.get(fmt)
    if st is None:
        if len(_HDR_STRUCTS) > 256:
            _HDR_STRUCTS.clear()
        st = _HDR_STRUCTS[fmt] = struct.Struct(fmt)
    return st


class Session:
    """One set of transport keys (one handshake). Receiving and sending state."""

    __slots__ = ("local_index", "remote_index", "send_aead", "recv_aead", "counter", "window",
                 "created", "prefix", "ridx", "confirmed", "initiator", "tx_fast")

    def __init__(self, send_key: bytes, recv_key: bytes, local_index: int, remote_index: int,
                 *, initiator: bool, window: int = 2048) -> None:
        self.local_index = local_index
        self.remote_index = remote_index
        self.send_aead = AESGCM(send_key)
        self.recv_aead = AESGCM(recv_key)
        self.counter = 0
        # With the C loops (accel) the window lives in C beside the receive key, so both
        # paths share it; the send key there seals super-frames (``tx_fast``).
        fp = accel.fastpath
        self.window = fp.RxState(recv_key, window) if fp else codec.ReplayWindow(window)
        self.tx_fast = fp.TxKey(send_key) if fp else None
        self.created = time.monotonic()
        self.prefix = codec.data_prefix(remote_index)
        self.ridx = self.prefix[4:]
        # The responder may only send with a new session once the initiator has used it
        # (proves the initiator has the keys); the initiator's sessions are confirmed at once.
        self.confirmed = initiator
        self.initiator = initiator

    def seal(self, plaintext, fmt: int = 0, csum_start: int = 0) -> bytes:
        c = self.counter
        self.counter = c + 1
        cb = c.to_bytes(8, "big")
        if fmt:
            header = bytes((codec.TYPE_DATA, fmt, csum_start >> 8, csum_start & 0xFF)) + self.ridx + cb
        else:
            header = self.prefix + cb
        return header + self.send_aead.encrypt(ZERO4 + cb, plaintext, header)


class Stats:
    """Counters a link reports to the agent."""

    __slots__ = ("tx_frames", "tx_bytes", "rx_frames", "rx_bytes", "drops", "last_rx", "last_tx",
                 "rtt_ms", "handshakes", "tx_packets", "rx_packets", "tx_super", "rx_coalesced", "mode")

    def __init__(self) -> None:
        self.tx_frames = self.tx_bytes = self.rx_frames = self.rx_bytes = 0
        self.tx_packets = self.rx_packets = 0       # data packets on the wire (segments)
        self.tx_super = self.rx_coalesced = 0       # TSO frames read / GSO frames written
        self.drops: Counter[str] = Counter()
        self.last_rx = 0.0          # monotonic time of the last authenticated packet
        self.last_tx = 0.0
        self.rtt_ms: float | None = None
        self.handshakes = 0
        self.mode = "per-packet"

    def as_dict(self) -> dict:
        now = time.monotonic()
        return {
            "tx_frames": self.tx_frames, "tx_bytes": self.tx_bytes,
            "rx_frames": self.rx_frames, "rx_bytes": self.rx_bytes,
            "tx_packets": self.tx_packets, "rx_packets": self.rx_packets,
            "tx_super": self.tx_super, "rx_coalesced": self.rx_coalesced,
            "datapath": self.mode,
            "drops": dict(self.drops),
            "since_last_rx": None if not self.last_rx else round(now - self.last_rx, 3),
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "handshakes": self.handshakes,
        }


class Datapath:
    """Frames of one link. The link worker sets ``current`` / ``sessions``, the path
    (``use_path``, or ``send`` for a bare send function) and the peer's hints
    (``set_peer_hints``); control plaintexts (keepalive, ping, pong) go to ``on_control``.

    ``tap`` (a ``tap.Tap``) gives the vnet header and offload switch; ``bridge_tso`` says
    whether the bridge behind the TAP takes GSO frames and partial checksums (with
    OVS's userspace datapath only with ``userspace-tso-enable``): only then do we
    accept offloaded frames from the peer, and coalesce. ``offload=False`` forces the
    per-packet path."""

    def __init__(self, tap_fd: int, stats: Stats, on_control: Callable[[Session, bytes], None],
                 on_handshake: Callable[[bytes, object, tuple], None], *, tap=None,
                 bridge_tso: bool = True, offload: bool = True) -> None:
        self.tap_fd = tap_fd
        self.tap = tap
        self.vnet = bool(tap is not None and tap.vnet)
        self.stats = stats
        self.on_control = on_control
        self.on_handshake = on_handshake
        self._send: Sender | None = None
        self._sock: socket.socket | None = None     # a dup of the direct path's socket, for GSO sends
        self._addr: tuple | None = None
        self._gso = batch_io.gso_supported()
        self.current: Session | None = None
        self.sessions: dict[int, Session] = {}     # local index -> session (current, previous, next)
        self.on_confirm: Callable[[Session], None] | None = None
        self.max_frame = 65535
        # what we accept from the peer (announced in our hints) and what we send it
        self.rx_offload = self.vnet and bridge_tso and offload
        self.tx_offload = False
        self.tx_cont = False                        # mark continuation segments (FMT_CONT)
        self._cont_s: Session | None = None         # the open run's last segment: session, counter + 1
        self._cont_n = -1
        self._allow = offload
        self._rbuf = bytearray(TAP_READ)
        self._rview = memoryview(self._rbuf)
        self._sbuf = bytearray(TAP_READ + 64 * DATA_OVERHEAD)   # one GSO send: headers + ciphertexts
        self._sview = memoryview(self._sbuf)
        self._nonce = bytearray(12)                 # 4 zero bytes + counter
        fp = accel.fastpath
        self._fx = fp.FastRx() if fp else None     # the C receive loop, sharing the coalescer's output
        self._co = gso.Coalescer(fast=self._fx)
        self._flush_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- negotiation and path ----------------------------------------------------
    def local_hints(self) -> dict:
        """What our link offer/answer announces: ``offload`` when we accept segmented,
        partial-checksum frames (format with FMT_* bits) and write them to a TSO bridge,
        with ``cont`` when we also take FMT_CONT."""
        return {"offload": OFFLOAD_VERSION, "cont": 1} if self.rx_offload else {}

    def set_peer_hints(self, hints) -> None:
        """The peer's hints for this attempt: send offloaded frames only if it takes them.
        Switches the TAP's offloads accordingly (TSO reads only when they can be sent)."""
        want = (self._allow and self.vnet and isinstance(hints, dict)
                and hints.get("offload") == OFFLOAD_VERSION)
        self.tx_offload = bool(self.tap.set_offloads(want)) if self.tap is not None and self.vnet else False
        self.tx_cont = self.tx_offload and hints.get("cont") == 1
        self.stats.mode = ("batched" if self.tx_offload else "per-packet") + \
            ("/coalescing" if self.rx_offload else "")

    def use_path(self, path) -> None:
        """Send on ``path`` (ice.Path): on a direct UDP path through a dup of its socket
        (one GSO ``sendmsg`` per group of segments), otherwise with its send function."""
        self.send = path.send
        if not self._gso or path.kind != "direct" or path.turn_inner is not None:
            return
        try:
            raw = path.protocol.transport.get_extra_info("socket")
            sock = socket.socket(fileno=os.dup(raw.fileno()))
        except (AttributeError, OSError, ValueError):
            return
        if sock.type != socket.SOCK_DGRAM:
            sock.close()
            return
        sock.setblocking(False)
        batch_io.tune_socket(sock, gro=False)
        self._sock, self._addr = sock, tuple(path.remote_addr)
        self._enable_gro(sock, path.protocol)

    def _enable_gro(self, sock: socket.socket, protocol) -> None:
        """UDP GRO on the path's socket: the peer's GSO sends then arrive as one buffer
        (on one machine the kernel does not even segment them). The socket is read by the
        event loop's transport, which knows nothing of GRO, so the segment size is
        recovered from the data: the next packet of a glued run carries the same receiver
        index and the next counter (a 12-byte pattern; a false match fails the AEAD and
        is counted). Pieces go back through the protocol (ours to us, STUN to aioice)."""
        if getattr(protocol, "_ipsw_gro", False):
            return
        try:
            sock.setsockopt(batch_io.SOL_UDP, batch_io.UDP_GRO, 1)
        except OSError:
            return
        inner = protocol.datagram_received
        data_t = codec.TYPE_DATA

        def datagram_received(data: bytes, addr: tuple) -> None:
            n = len(data)
            if n < 2 * codec.DATA_MIN_LEN or data[0] != data_t:
                inner(data, addr)
                return
            nxt = data[4:8] + ((int.from_bytes(data[8:16], "big") + 1) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")
            p = data.find(nxt, codec.DATA_MIN_LEN)
            seg = p - 4 if p >= 0 and data[p - 4] == data_t else n
            self.receive(data, seg, addr, protocol, inner)     # data packets skip the hooks
        protocol.datagram_received = datagram_received
        protocol._ipsw_gro = True

    @property
    def send(self) -> Sender | None:
        return self._send

    @send.setter
    def send(self, fn: Sender | None) -> None:
        self._send = fn
        if self._sock is not None:
            self._sock.close()
            self._sock = self._addr = None

    # -- TAP -> UDP ------------------------------------------------------------
    def tap_readable(self) -> None:
        fd, st, vnet = self.tap_fd, self.stats, self.vnet
        buf, view = self._rbuf, self._rview
        for _ in range(TAP_BURST):
            try:
                n = os.readv(fd, (buf,))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                st.drops["tap_read"] += 1
                break
            s = self.current
            if s is None or self._send is None or not s.confirmed:
                st.drops["no_session"] += 1
                continue
            if s.counter >= codec.REJECT_AFTER_MESSAGES - 1024:
                st.drops["counter_exhausted"] += 1
                continue
            fmt = cs = 0
            if vnet:
                if n < gso.VNET_LEN + codec.ETH_MIN:
                    st.drops["tap_short"] += 1
                    continue
                frame = view[gso.VNET_LEN:n]
                gtype = buf[1] & ~gso.GSO_ECN
                if gtype:
                    self._send_super(s, frame, gtype, buf[4] | buf[5] << 8, buf[6] | buf[7] << 8,
                                     gso.VNET_LEN)
                    continue
                if buf[0] & gso.F_NEEDS_CSUM:
                    cs, co = buf[6] | buf[7] << 8, buf[8] | buf[9] << 8
                    if self.tx_offload and co in (6, 16) and gso.ETH_LEN <= cs <= n - gso.VNET_LEN - co - 2:
                        fmt = FMT_CSUM | (FMT_TCP if co == 16 else 0)
                    else:                                   # the peer wants complete frames
                        frame = bytearray(frame)
                        try:
                            gso.complete_checksum(frame, cs, co)
                        except Exception:
                            st.drops["tap_bad_csum"] += 1
                            continue
                        cs = 0
            else:
                frame = view[:n]
            if len(frame) > self.max_frame:
                st.drops["too_big"] += 1
                continue
            try:
                self._send(s.seal(frame, fmt, cs))
            except OSError:
                st.drops["send_error"] += 1
                continue
            st.tx_frames += 1
            st.tx_packets += 1
            st.tx_bytes += len(frame)
        st.last_tx = time.monotonic()

    def _send_super(self, s: Session, frame: memoryview, gtype: int, gso_size: int, cs: int,
                    fo: int = -1) -> None:
        """A TSO super-frame: one data packet per MSS segment, sent in GSO groups.

        Fused segmentation and sealing without per-segment objects: segment i's plaintext
        is built *in the TAP read buffer* right before its payload chunk (its headers
        overwrite the tail of segment i-1, already sealed), and ``encrypt_into`` writes
        header + ciphertext back to back into one preallocated buffer laid out as the GSO
        send (``_sbuf``). Same wire bytes as ``gso.segment`` + ``Session.seal``.
        ``fo``: where ``frame`` starts in ``_rbuf`` (-1: elsewhere, copied first)."""
        st = self.stats
        if not self.tx_offload or gtype not in (gso.GSO_TCPV4, gso.GSO_TCPV6):
            st.drops["gso_unexpected"] += 1
            return
        try:
            lay = gso.Layout(frame)
        except gso.OffloadError as e:
            st.drops["tap_" + e.reason] += 1
            return
        if gso_size <= 0:
            st.drops["tap_bad_gso_size"] += 1
            return
        po = lay.payload_off
        flen = len(frame)
        plen = flen - po
        n = max(1, -(-plen // gso_size))
        if n > 1024:
            st.drops["tap_too_many_segments"] += 1
            return
        full_dg = DATA_OVERHEAD + po + min(gso_size, plen)
        per_group = max(1, min(batch_io.GSO_MAX_SEGMENTS, batch_io.GSO_MAX_BYTES // full_dg))
        prefix = bytes((codec.TYPE_DATA, _FMT_SEG, cs >> 8, cs & 0xFF)) + s.ridx
        prefix_next = bytes((codec.TYPE_DATA, _FMT_CONT_SEG, cs >> 8, cs & 0xFF)) + s.ridx if self.tx_cont else prefix
        c = s.counter
        s.counter = c + n
        st.tx_frames += 1
        st.tx_super += 1
        st.tx_packets += n
        st.tx_bytes += flen
        if s.tx_fast is not None:           # the C loop: one call seals a GSO group
            seal, sbuf, sview = s.tx_fast.seal_tcp, self._sbuf, self._sview
            t = lay.tcp_off
            for i in range(0, n, per_group):
                j = min(n, i + per_group)
                self._send_group(sview, seal(frame, po, t, gso_size, i, j, c, prefix, prefix_next, sbuf),
                                 j - i, full_dg)
            return
        if fo < 0:                          # not in our read buffer: work on a copy
            buf, fo = bytearray(frame), 0
        else:
            buf = self._rbuf
        view = memoryview(buf)
        template = bytes(buf[fo:fo + po])
        t, ip = lay.tcp_off, lay.ip_off
        v4 = lay.ver == 4
        seq0 = _I.unpack_from(template, t + 4)[0]
        flags0 = template[t + 13]
        tcp_hlen = lay.tcp_len
        ip_hlen = lay.ip_len
        if v4:
            ip_id0 = _H.unpack_from(template, ip + 4)[0]
            tb = bytearray(template)
            for o in (2, 4, 10):
                _H.pack_into(tb, ip + o, 0)
            base = gso._sum_words(tb[ip:ip + ip_hlen])
            addr = gso._sum_words(tb[ip + 12:ip + 20])
        else:
            ip_id0 = base = 0
            addr = gso._sum_words(template[ip + 8:ip + 40])
        # One struct writes a segment's whole header in place: the per-segment fields
        # (lengths, IPv4 id and checksum, seq, flags, TCP partial sum) between constant runs.
        if v4:
            hs = _hdr_struct(f"!{ip + 2}sHH4sH{t + 4 - ip - 12}sI5sB2sH{po - t - 18}s")
            A, B, C = template[:ip + 2], template[ip + 6:ip + 10], template[ip + 12:t + 4]
        else:
            hs = _hdr_struct(f"!{ip + 4}sH{t + 4 - ip - 6}sI5sB2sH{po - t - 18}s")
            A, B, C = template[:ip + 4], b"", template[ip + 6:t + 4]
        D, E, F = template[t + 8:t + 13], template[t + 14:t + 16], template[t + 18:po]
        hpack = hs.pack_into
        f_mid = flags0 & ~(gso.TCP_FIN | gso.TCP_PSH | gso.TCP_CWR)
        f_first = f_mid | (flags0 & gso.TCP_CWR)
        f_last = flags0 if n == 1 else f_mid | (flags0 & (gso.TCP_FIN | gso.TCP_PSH))
        enc = s.send_aead.encrypt_into
        sbuf, sview, nonce = self._sbuf, self._sview, self._nonce
        pack_hdr, pack_q = _HDR.pack_into, _Q.pack_into
        # full-size segments share their lengths and the part of their sums that depends on them
        full_tcp = tcp_hlen + gso_size
        full_total = ip_hlen + full_tcp
        full_tsum = gso._fold(addr + 6 + full_tcp)
        full_ipbase = base + full_total
        last = n - 1
        off = 0
        in_group = 0
        m = po + gso_size
        for i in range(n):
            p = fo + i * gso_size
            if i == last:
                clen = plen - i * gso_size
                m = po + clen
                tcp_len = tcp_hlen + clen
                total = ip_hlen + tcp_len
                tsum = gso._fold(addr + 6 + tcp_len)
                ipbase = base + total
                f = f_last
            else:
                tcp_len, total, tsum, ipbase = full_tcp, full_total, full_tsum, full_ipbase
                f = f_mid if i else f_first
            seq = (seq0 + i * gso_size) & 0xFFFFFFFF
            if v4:
                ip_id = (ip_id0 + i) & 0xFFFF
                x = ipbase + ip_id
                x = (x & 0xFFFF) + (x >> 16)
                x = (x & 0xFFFF) + (x >> 16)
                hpack(buf, p, A, total, ip_id, B, ~x & 0xFFFF, C, seq, D, f, E, tsum, F)
            else:
                hpack(buf, p, A, tcp_len, C, seq, D, f, E, tsum, F)
            pack_hdr(sbuf, off, prefix_next if i else prefix, c)
            pack_q(nonce, 4, c)
            c += 1
            enc(nonce, view[p:p + m], sview[off:off + 16], sview[off + 16:off + 32 + m])
            off += 32 + m
            in_group += 1
            if in_group == per_group or i == n - 1:
                self._send_group(sview, off, in_group, full_dg)
                off = in_group = 0

    def _send_group(self, sview: memoryview, length: int, count: int, size: int) -> bool:
        """Send ``count`` datagrams laid out back to back in ``sview[:length]`` (all of
        ``size`` bytes but the last): one GSO ``sendmsg`` on a direct path, else one by one."""
        sock = self._sock
        if sock is not None:
            try:
                if count == 1:
                    sock.sendto(sview[:length], self._addr)
                else:
                    sock.sendmsg((sview[:length],), [(batch_io.SOL_UDP, batch_io.UDP_SEGMENT,
                                                      _U16.pack(size))], 0, self._addr)
                return True
            except BlockingIOError:
                self.stats.drops["send_full"] += count
                return False
            except OSError:                 # GSO refused on this route: per datagram from now on
                self.stats.drops["gso_send_error"] += 1
                self._gso = False
                sock.close()
                self._sock = None
        send = self._send
        ok = True
        for o in range(0, length, size):
            try:
                send(bytes(sview[o:min(o + size, length)]))  # type: ignore[misc]
            except OSError:
                self.stats.drops["send_error"] += 1
                ok = False
        return ok

    def send_control(self, plaintext: bytes) -> bool:
        s, send = self.current, self._send
        if s is None or send is None or not s.confirmed:
            return False
        try:
            send(s.seal(plaintext))
        except OSError:
            self.stats.drops["send_error"] += 1
            return False
        self.stats.last_tx = time.monotonic()
        return True

    # -- UDP -> TAP ------------------------------------------------------------
    def datagram(self, data: bytes, addr: tuple, protocol: object) -> None:
        """Every datagram whose first byte is one of ours lands here."""
        self.receive(data, len(data), addr, protocol, None)

    def receive(self, data: bytes, seg: int, addr: tuple, protocol: object,
                other: Callable[[bytes, tuple], None] | None) -> None:
        """The datagrams in ``data``, each ``seg`` bytes but the last (one UDP GRO buffer;
        ``seg == len(data)`` for a single datagram). One loop for a whole burst: this runs
        per received MSS, so the session, its replay window and the coalescer are looked
        up once and nothing is sliced but the header fields. With the C loops (accel),
        runs of TCP segments of a confirmed session go to ``FastRx.open_burst``, which
        stops at anything else; this loop handles that packet and counts its drop.
        Pieces that are not data packets go to ``other`` (aioice's own receive for a
        STUN message glued to a burst), handshake messages to ``on_handshake``."""
        st = self.stats
        data_t, min_len = codec.TYPE_DATA, codec.DATA_MIN_LEN
        eth_min = codec.ETH_MIN
        tcp_ok = self.vnet and self.rx_offload
        co = self._co
        co_add, co_cont, out = co.add_segment, co.add_continuation, co.out
        fx = self._fx
        cont_s, cont_n = self._cont_s, self._cont_n
        mv = memoryview(data)
        n = len(data)
        sessions = self.sessions
        s_key = s = w = None
        coalesce = fast = False     # the session's TCP segments go to the coalescer (in C: fast)
        queued = got = 0
        unpack, nonce = _RX_HDR.unpack_from, _NONCE.pack
        o = 0
        while o < n:
            e = o + seg if o + seg < n else n
            if data[o] != data_t:
                piece = data[o:e] if seg < n else data
                if other is not None:
                    other(piece, addr)
                else:
                    self.on_handshake(piece, protocol, addr)
                s_key = None
                o = e
                continue
            if e - o < min_len:
                st.drops["malformed"] += 1
                o = e
                continue
            _, fmt, cs, key, counter = unpack(data, o)
            if fmt != _FMT_SEG:
                if not fmt:
                    if cs:
                        st.drops["malformed"] += 1
                        o = e
                        continue
                elif fmt & ~FMT_KNOWN or not fmt & FMT_CSUM or (fmt & FMT_CONT and fmt != _FMT_CONT_SEG):
                    st.drops["malformed"] += 1
                    o = e
                    continue
            if fmt and not self.rx_offload:
                st.drops["offload_refused"] += 1    # we never announced it: a confused or hostile peer
                o = e
                continue
            if key != s_key:
                s = sessions.get(int.from_bytes(key, "little"))
                s_key = key
                if s is not None:
                    w = s.window
                    coalesce = tcp_ok and s.confirmed
                    fast = coalesce and fx is not None and s.tx_fast is not None   # made with the C loops
            if s is None:
                st.drops["unknown_index"] += 1
                o = e
                continue
            plain = None
            if fast and fmt & FMT_TCP:
                if co.run:
                    co.end_run()
                o2, k, plain, pfmt, pcs = fx.open_burst(w, key, data, o, seg, out)
                got += k
                queued += k
                if plain is None:
                    if o2 != o:
                        o = o2
                        continue
                    # a replay, a bad tag, ...: not consumed; the Python path below counts it
                else:               # authenticated, the C loop does not coalesce it: as below
                    e, fmt, cs, counter = o2, pfmt, pcs, -1
            if plain is None:
                if not w.check(counter):
                    st.drops["replay"] += 1
                    o = e
                    continue
                try:
                    plain = s.recv_aead.decrypt(nonce(counter), mv[o + 16:e], mv[o:o + 16])
                except InvalidTag:
                    st.drops["auth"] += 1
                    o = e
                    continue
                w.update(counter)
                got += 1
            o = e
            if fmt & FMT_TCP and coalesce and len(plain) >= eth_min:
                # the hot case, a TCP segment to coalesce: last_rx is set once per burst in flush().
                # The next segment of the run's super-frame (marked, next counter) is appended
                # as it is; the merged frame's headers are the run's first and are checked.
                if fmt == _FMT_CONT_SEG and counter == cont_n and s is cont_s and co_cont(plain):
                    cont_n = counter + 1
                    queued += 1
                    continue
                try:
                    co_add(plain, cs)
                except gso.OffloadError as err:
                    st.drops["offload_" + err.reason] += 1
                    continue
                cont_s, cont_n = s, counter + 1
                queued += 1
                continue
            queued += self._deliver(s, fmt, cs, plain)
            s_key = cont_s = None       # a control message may have changed the sessions
        self._cont_s, self._cont_n = cont_s, cont_n
        st.rx_packets += got
        if queued and not self._flush_pending:
            self._flush_pending = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self.flush)

    def _deliver(self, s: Session, fmt: int, cs: int, plain: bytes) -> int:
        """An authenticated plaintext that is not a TCP segment to coalesce: a control
        message, or a frame for the TAP (behind queued segments, never before them).
        Returns 1 when the coalescer now holds something to flush."""
        st = self.stats
        st.last_rx = time.monotonic()
        if not s.confirmed:
            s.confirmed = True
            if self.on_confirm:
                self.on_confirm(s)
        if len(plain) < codec.ETH_MIN:
            if fmt:
                st.drops["bad_offload"] += 1
                return 0
            self.on_control(s, plain)
            return 0
        if not self.vnet:
            self._write(b"", plain)        # a TAP without vnet header: the frame alone
            return 0
        co = self._co
        if not fmt:
            if len(co):
                co.add_frame(gso.NO_VNET, plain)
                return 1
            self._write(gso.NO_VNET, plain)
            return 0
        if fmt & FMT_TCP:
            try:
                co.add_segment(plain, cs)
            except gso.OffloadError as e:
                st.drops["offload_" + e.reason] += 1
                return 0
            return 1
        vh = gso.VNET.pack(gso.F_NEEDS_CSUM, gso.GSO_NONE, 0, 0, cs, 6)
        try:
            gso.check_vnet(vh, plain)
        except gso.OffloadError as e:
            st.drops["offload_" + e.reason] += 1
            return 0
        if len(co):
            co.add_frame(vh, plain)
            return 1
        self._write(vh, plain)
        return 0

    def flush(self) -> None:
        """End of a receive burst: write what the coalescer holds, one TAP write per run."""
        self._flush_pending = False
        st = self.stats
        st.last_rx = time.monotonic()               # for the segments queued since the last flush
        for vh, frame in self._co.flush():
            if vh[1]:                                   # a merged GSO frame: validate what we built
                try:
                    gso.check_vnet(vh, frame)
                except gso.OffloadError as e:
                    st.drops["offload_" + e.reason] += 1
                    continue
                st.rx_coalesced += 1
            self._write(vh, frame)

    def _write(self, vh: bytes, frame) -> None:
        """One frame to the TAP behind its vnet header (``b""`` for a TAP without one)."""
        try:
            os.writev(self.tap_fd, (vh, frame))
        except (BlockingIOError, InterruptedError):
            self.stats.drops["tap_full"] += 1
            return
        except OSError:
            self.stats.drops["tap_write"] += 1
            return
        self.stats.rx_frames += 1
        self.stats.rx_bytes += len(frame)

