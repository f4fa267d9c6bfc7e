"""Sending one link's frames: TAP read -> segment and seal -> UDP (GSO) send.

A read from the TAP is either a complete frame, sealed alone as one data packet, or (in
the batched mode, docs/tunnel.md "Offload negotiation") a TCP super-frame of up to
64 KiB: it is cut into MSS segments, each sealed as its own data packet (a lost datagram
loses one segment), and the datagrams leave in groups of one UDP GSO ``sendmsg``: on a
direct path, to a peer's TURN relay, and through our own TURN allocation with each
datagram behind its 4-byte ChannelData header in the same buffer (docs/tunnel.md §4). The per-segment loop runs in C when the extension is built (``accel``,
``Session.tx_fast``), with the same wire bytes. The TAP is read with ``add_reader``, up
to ``TAP_BURST`` frames per wake-up. Nothing here raises on bad input: drops are counted.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Callable

from . import batch_io, codec, gso
from .session import Session, SessionTable
from .stats import Stats

TAP_BURST = 64
TAP_READ = 65536 + gso.VNET_LEN + 64        # a 64 KiB IP packet + Ethernet (+ VLAN) + vnet header
DATA_OVERHEAD = codec.OVERHEAD              # data packet header (16) + GCM tag (16)
_HDR = struct.Struct("!8sQ")                # data header: type, format, csum_start, index | counter
_Q = struct.Struct("!Q")
_I = struct.Struct("!I")
_H = struct.Struct("!H")
_U16 = struct.Struct("=H")
_CHAN = struct.Struct("!HH")                # TURN ChannelData header: channel, length
CHAN_LEN = 4

SendFn = Callable[[bytes], None]

_HDR_STRUCTS: dict[str, struct.Struct] = {}


def _hdr_struct(fmt: str) -> struct.Struct:
    """A cached ``struct.Struct`` (a flow's header layout repeats for every super-frame)."""
    st = _HDR_STRUCTS.get(fmt)
    if st is None:
        if len(_HDR_STRUCTS) > 256:
            _HDR_STRUCTS.clear()
        st = _HDR_STRUCTS[fmt] = struct.Struct(fmt)
    return st


class Sender:
    """The sending half of a link's datapath. ``send`` is the path's send function (set by
    ``use_path`` or directly); ``table.current`` seals. ``tx_offload``: the peer takes
    segments with partial checksums (``set_peer_hints``), so TSO reads are switched on."""

    def __init__(self, tap_fd: int, stats: Stats, table: SessionTable, *, tap=None,
                 allow_offload: bool = True) -> None:
        self.tap_fd = tap_fd
        self.tap = tap
        self.vnet = bool(tap is not None and tap.vnet)
        self.stats = stats
        self.table = table
        self._send: SendFn | None = None
        self._sock: socket.socket | None = None     # a dup of the direct path's socket, for GSO sends
        self._addr: tuple | None = None
        self._chan = -1                             # GSO through our TURN allocation: its channel
        self._gso = batch_io.gso_supported()
        self.max_frame = 65535
        self.tx_offload = False
        self.tx_cont = False                        # mark continuation segments (FMT_CONT)
        self._allow = allow_offload
        self._rbuf = bytearray(TAP_READ)
        self._rview = memoryview(self._rbuf)
        self._sbuf = bytearray(TAP_READ + 64 * (DATA_OVERHEAD + CHAN_LEN))   # one GSO send
        self._sview = memoryview(self._sbuf)
        self._nonce = bytearray(12)                 # 4 zero bytes + counter

    # -- negotiation and path ----------------------------------------------------
    def set_peer_hints(self, hints) -> None:
        """The peer's hints for this attempt: send offloaded frames only if it takes them.
        Switches the TAP's offloads accordingly (TSO reads only when they can be sent)."""
        want = (self._allow and self.vnet and isinstance(hints, dict)
                and hints.get("offload") == codec.OFFLOAD_VERSION)
        self.tx_offload = bool(self.tap.set_offloads(want)) if self.tap is not None and self.vnet else False
        self.tx_cont = self.tx_offload and hints.get("cont") == 1

    def use_path(self, path) -> bool:
        """Send on ``path`` (ice.Path): segments through a dup of its UDP socket (one GSO
        ``sendmsg`` per group of segments; through our TURN allocation each behind its
        ChannelData header, to the TURN server), everything else and any path without such
        a socket with its send function. True if the GSO socket is in use."""
        self.send = path.send
        if not self._gso:
            return False
        sock = path.dup_socket()
        if sock is None:
            return False
        batch_io.tune_socket(sock, gro=False)
        if path.turn_inner is not None:
            try:
                self._addr = sock.getpeername()     # the TURN server (aioice connects the socket)
            except OSError:
                sock.close()
                return False
            self._chan = path.channel
        else:
            self._addr = tuple(path.remote_addr)
        self._sock = sock
        return True

    @property
    def send(self) -> SendFn | None:
        return self._send

    @send.setter
    def send(self, fn: SendFn | None) -> None:
        self._send = fn
        self._chan = -1
        if self._sock is not None:
            self._sock.close()
            self._sock = self._addr = None

    # -- TAP -> UDP ------------------------------------------------------------
    def tap_readable(self) -> None:
        fd, st, vnet = self.tap_fd, self.stats, self.vnet
        sent = st.tx_packets
        buf, view = self._rbuf, self._rview
        for _ in range(TAP_BURST):
            try:
                n = os.readv(fd, (buf,))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                st.drops["tap_read"] += 1
                break
            s = self.table.current
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
                        fmt = codec.FMT_CSUM | (codec.FMT_TCP if co == 16 else 0)
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
        if st.tx_packets != sent:
            st.data_sent(time.monotonic())

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
        chan = self._chan if self._sock is not None else -1
        ch = CHAN_LEN if chan >= 0 else 0           # each datagram behind its ChannelData header
        full_dg = ch + DATA_OVERHEAD + po + min(gso_size, plen)
        per_group = max(1, min(batch_io.GSO_MAX_SEGMENTS, batch_io.GSO_MAX_BYTES // full_dg))
        prefix = bytes((codec.TYPE_DATA, codec.FMT_SEG, cs >> 8, cs & 0xFF)) + s.ridx
        prefix_next = bytes((codec.TYPE_DATA, codec.FMT_CONT_SEG, cs >> 8, cs & 0xFF)) + s.ridx if self.tx_cont else prefix
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
                self._send_group(sview, seal(frame, po, t, gso_size, i, j, c, prefix, prefix_next, sbuf, chan),
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
            if ch:
                _CHAN.pack_into(sbuf, off, chan, 32 + m)
                off += ch
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
        ``size`` bytes but the last, ChannelData headers included when sent through our
        TURN allocation): one GSO ``sendmsg``, else one by one with the path's send
        function (which frames them itself)."""
        sock = self._sock
        if sock is not None:
            try:
                if count == 1:
                    sock.sendto(sview[:length], self._addr)
                else:
                    sock.sendmsg((sview[:length],), [(batch_io.SOL_UDP, batch_io.UDP_SEGMENT,
                                                      _U16.pack(size))], 0, self._addr)
                    self.stats.tx_gso += 1
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
        ch = CHAN_LEN if self._chan >= 0 else 0
        self._chan = -1 if self._sock is None else self._chan
        ok = True
        for o in range(0, length, size):
            try:
                send(bytes(sview[o + ch:min(o + size, length)]))  # type: ignore[misc]
            except OSError:
                self.stats.drops["send_error"] += 1
                ok = False
        return ok

    def send_control(self, plaintext: bytes) -> bool:
        s, send = self.table.current, self._send
        if s is None or send is None or not s.confirmed:
            return False
        try:
            send(s.seal(plaintext))
        except OSError:
            self.stats.drops["send_error"] += 1
            return False
        self.stats.last_tx = time.monotonic()
        return True

