"""Receiving one link's frames: UDP (GRO) burst -> replay check and open -> coalesce -> TAP write.

``receive`` takes one buffer of datagrams (a UDP GRO burst split by ice.py's socket hook,
or a single datagram) and runs one loop over it: the session, its replay window and the
coalescer are looked up once per burst. In the batched mode TCP segments of one
super-frame are queued and written as one GSO frame per run (``gso.Coalescer``): it is
the largest single lever measured (868 -> 2033 Mbit/s for one TCP stream when it came),
and it also cuts the ACKs crossing the tunnel to about one per super-frame. The per-segment loop runs
in C when the extension is built (``accel``, ``FastRx``), writing the same frames. Every
offload header from the peer is checked (``gso.check_vnet`` or the coalescer's parser)
before a TAP write; refusals, like every other bad input, are counted drops.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from typing import Callable

from cryptography.exceptions import InvalidTag

from . import accel, codec, gso
from .session import Session, SessionTable
from .stats import Stats

_RX_HDR = struct.Struct("!BBH4sQ")          # data header: type, format, csum_start, receiver index (LE), counter
_NONCE = struct.Struct("!4xQ")              # AEAD nonce: 4 zero bytes, the counter
FMT_CSUM, FMT_TCP, FMT_CONT, FMT_KNOWN = codec.FMT_CSUM, codec.FMT_TCP, codec.FMT_CONT, codec.FMT_KNOWN
_FMT_SEG, _FMT_CONT_SEG = codec.FMT_SEG, codec.FMT_CONT_SEG     # module globals: read per packet

OnControl = Callable[[Session, bytes], None]
OnHandshake = Callable[[bytes, object, tuple], None]


class Receiver:
    """The receiving half of a link's datapath. Opens with any session in ``table.by_index``;
    control plaintexts (keepalive, ping, pong) go to ``on_control``, handshake messages to
    ``on_handshake``, the first packet of an unconfirmed session to ``on_confirm``.
    ``accept_offload``: we take segmented, partial-checksum frames (the bridge behind the
    TAP does TSO) and announce it in ``local_hints``."""

    def __init__(self, tap_fd: int, stats: Stats, table: SessionTable, on_control: OnControl,
                 on_handshake: OnHandshake, *, vnet: bool, accept_offload: bool) -> None:
        self.tap_fd = tap_fd
        self.vnet = vnet
        self.stats = stats
        self.table = table
        self.on_control = on_control
        self.on_handshake = on_handshake
        self.on_confirm: Callable[[Session], None] | None = None
        self.rx_offload = accept_offload
        self._cont_s: Session | None = None         # the open run's last segment: session, counter + 1
        self._cont_n = -1
        fp = accel.fastpath
        self._fx = fp.FastRx() if fp else None     # the C receive loop, sharing the coalescer's output
        self._co = gso.Coalescer(fast=self._fx)
        self._flush_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def local_hints(self) -> dict:
        """What our link offer/answer announces: ``offload`` when we accept segmented,
        partial-checksum frames (format with FMT_* bits) and write them to a TSO bridge,
        with ``cont`` when we also take FMT_CONT."""
        return {"offload": codec.OFFLOAD_VERSION, "cont": 1} if self.rx_offload else {}

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
        consumes forged packets (counted here as ``auth``) and stops at anything else;
        this loop handles that packet and counts its drop.
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
        sessions = self.table.by_index
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
                o2, k, plain, pfmt, pcs, bad = fx.open_burst(w, key, data, o, seg, out)
                got += k
                queued += k
                if bad:             # forgeries: consumed and counted in C, decrypted once
                    st.drops["auth"] += bad
                if plain is None:
                    if o2 != o:
                        o = o2
                        continue
                    # a replay, another format, ...: not consumed; the Python path below counts it
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

