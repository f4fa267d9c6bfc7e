"""The datapath between two ends, wire and TAPs included, without a lab.

Each end's TAP is a SOCK_SEQPACKET socketpair: the datapath reads and writes one record
per frame with the same system calls (readv/writev) and the same 10-byte virtio-net
header a TAP opened with IFF_VNET_HDR uses, and the test sits on the other end where
the kernel's TAP side would be. The real TAP, OVS and the kernel's TSO/GSO are covered
by tests/test_datapath_lab.py; here hypothesis can throw any frame, loss or hostile
offload format at the code.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
import struct
import time

from hypothesis import given, settings, strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

import pytest

from ipop_switch.tunnel import accel, batch_io, codec, gso, ice
from ipop_switch.tunnel.codec import FMT_CONT, FMT_CSUM, FMT_TCP
from ipop_switch.tunnel.datapath import Datapath
from ipop_switch.tunnel.session import Session
from ipop_switch.tunnel.stats import Stats

SEG, CONT = FMT_CSUM | FMT_TCP, FMT_CSUM | FMT_TCP | FMT_CONT
from helpers.seq_tap import SeqTap
from test_gso import complete_checksum, tcp_ok

BUF = 4 * 1024 * 1024


# the extension itself, also when IPSW_NO_ACCEL keeps the datapath off it (an ImportError
# here means it was not built: bootstrap.sh installs what building it needs)
_fp = accel.fastpath or importlib.import_module("ipop_switch.tunnel._fastpath")


@pytest.fixture(scope="module", autouse=True, params=["c", "python"])
def loops(request):
    """Every test here runs twice: with the datapath's C loops (accel) and with its Python
    ones, whatever IPSW_NO_ACCEL says. Sessions and datapaths pick theirs when made, so
    the switch is set around the test."""
    saved = accel.fastpath
    accel.fastpath = _fp if request.param == "c" else None
    yield request.param
    accel.fastpath = saved


class Pair:
    """Two datapaths with matching sessions; a -> b over a list standing in for the wire."""

    def __init__(self, *, b_takes_offload: bool = True, a_takes_offload: bool = True) -> None:
        k1, k2 = self.keys = os.urandom(32), os.urandom(32)
        self.ta, self.tb = SeqTap(), SeqTap()
        self.wire: list[bytes] = []
        self.controls: list[bytes] = []
        self.a = Datapath(self.ta.fd, Stats(), lambda s, p: self.controls.append(p), lambda *a: None,
                          tap=self.ta, bridge_tso=a_takes_offload)
        self.b = Datapath(self.tb.fd, Stats(), lambda s, p: self.controls.append(p), lambda *a: None,
                          tap=self.tb, bridge_tso=b_takes_offload)
        self.sa = Session(k1, k2, 11, 22, initiator=True)
        self.sb = Session(k2, k1, 22, 11, initiator=True)
        self.a.table.current, self.a.table.by_index[11] = self.sa, self.sa
        self.b.table.current, self.b.table.by_index[22] = self.sb, self.sb
        self.a.send = self.wire.append
        self.a.set_peer_hints(self.b.local_hints())
        self.b.set_peer_hints(self.a.local_hints())

    def tap_in(self, vnet: bytes, frame: bytes) -> None:
        """A frame the bridge sends into a's TAP; a reads it."""
        self.ta.kernel.send(vnet + frame)
        self.a.tap_readable()

    async def deliver(self, keep=lambda i: True) -> list[tuple[bytes, bytes]]:
        """The wire's datagrams into b (minus those ``keep`` drops), then what b wrote to its TAP."""
        wire, self.wire[:] = list(self.wire), []
        for i, d in enumerate(wire):
            if keep(i):
                self.b.datagram(d, ("198.18.0.9", 1), None)
        await asyncio.sleep(0)             # the end-of-burst flush
        await asyncio.sleep(0)
        return self.tb.frames()

    def seal_raw(self, fmt: int, cs: int, plaintext: bytes) -> bytes:
        """A data packet from a with any format byte and csum_start (what a hostile peer with
        the keys can send: the AEAD covers the header, so it is built properly)."""
        c = self.sa.counter
        self.sa.counter = c + 1
        hdr = bytes((codec.TYPE_DATA, fmt, cs >> 8, cs & 0xFF)) + self.sa.ridx + c.to_bytes(8, "big")
        return hdr + self.sa.send_aead.encrypt(b"\0\0\0\0" + hdr[8:], plaintext, hdr)

    def close(self) -> None:
        self.ta.close()
        self.tb.close()


def run(coro):
    return asyncio.run(coro)


def tso_frame(v6: bool, payload: bytes, opts, flags: str, seq: int, ipid: int) -> bytes:
    ip = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="100.96.0.1", dst="100.96.0.2", id=ipid, flags="DF")
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip
                 / TCP(sport=40000, dport=5201, seq=seq, ack=777, flags=flags, window=500, options=opts) / payload)


super_frames = st.builds(
    lambda *a: a,
    st.booleans(), st.binary(min_size=1, max_size=30000),
    st.sampled_from([[], [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))], [("MSS", 1360)]]),
    st.sampled_from(["A", "PA", "FPA", "CA", "CPA", "EA", "FA"]),
    st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=0, max_value=65535),
    st.integers(min_value=64, max_value=1448),
)


def with_partial(frame: bytes) -> bytes:
    """The frame as a TAP with checksum offload hands it over: the TCP checksum field holds
    the pseudo-header partial sum."""
    lay = gso.Layout(frame)
    b = bytearray(frame)
    struct.pack_into("!H", b, lay.tcp_off + 16, gso.pseudo_partial(lay.ver, b[14:lay.tcp_off], len(b) - lay.tcp_off))
    return bytes(b)


def tso_vnet(frame: bytes, mss: int) -> bytes:
    lay = gso.Layout(frame)
    return gso.VNET.pack(gso.F_NEEDS_CSUM, gso.GSO_TCPV6 if lay.ver == 6 else gso.GSO_TCPV4,
                         lay.payload_off, mss, lay.tcp_off, 16)


def payload(frame: bytes) -> bytes:
    return frame[gso.Layout(frame).payload_off:]


def check_written(frames: list[tuple[bytes, bytes]]) -> None:
    """Everything b wrote is what a kernel would accept and checksums complete correctly."""
    for vnet, f in frames:
        gso.check_vnet(vnet, f)
        flags, gtype, _, gsize, cs, co = gso.VNET.unpack(vnet)
        if gtype:
            for seg in gso.segment(f, gsize):
                assert tcp_ok(complete_checksum(bytes(seg), cs, co))
        elif flags & gso.F_NEEDS_CSUM:
            assert tcp_ok(complete_checksum(f, cs, co))


@settings(max_examples=120, deadline=None)
@given(super_frames)
def test_super_frame_crosses_segmented_and_comes_out_coalesced(sf):
    v6, data, opts, flags, seq, ipid, mss = sf
    frame = tso_frame(v6, data, opts, flags, seq, ipid)

    async def go():
        p = Pair()
        try:
            p.tap_in(tso_vnet(frame, mss), frame)
            n = len(p.wire)
            assert n == max(1, -(-len(data) // mss))                     # one datagram per segment
            assert [d[1] for d in p.wire] == [SEG] + [CONT] * (n - 1)       # the rest continue the first
            out = await p.deliver()
            assert b"".join(payload(f) for _, f in out) == data
            assert len(out) <= -(-(len(data) + 200) // 65000) + 1          # coalesced, not one per segment
            check_written(out)
            if len(out) == 1:                                             # headers as sent but the checksum
                a, b = bytearray(out[0][1][:gso.Layout(frame).payload_off]), bytearray(frame[:gso.Layout(frame).payload_off])
                t = gso.Layout(frame).tcp_off
                a[t + 16:t + 18] = b[t + 16:t + 18] = b"\0\0"
                assert a == b
            assert not p.a.stats.drops and not p.b.stats.drops
        finally:
            p.close()
    run(go())


@settings(max_examples=80, deadline=None)
@given(super_frames, st.data())
def test_a_lost_datagram_loses_only_its_segment(sf, data):
    v6, body, opts, flags, seq, ipid, mss = sf
    frame = tso_frame(v6, body, opts, flags, seq, ipid)

    async def go():
        p = Pair()
        try:
            p.tap_in(tso_vnet(frame, mss), frame)
            n = len(p.wire)
            lost = data.draw(st.integers(min_value=0, max_value=n - 1))
            out = await p.deliver(keep=lambda i: i != lost)
            kept = b"".join(body[i * mss:(i + 1) * mss] for i in range(n) if i != lost)
            assert b"".join(payload(f) for _, f in out) == kept
            assert len(out) <= 2 + len(kept) // 60000
            check_written(out)
        finally:
            p.close()
    run(go())


def test_frames_of_other_kinds_pass_one_by_one_in_order():
    udp_partial = bytearray(bytes(Ether() / IP(src="100.96.0.1", dst="100.96.0.2") / UDP(sport=5, dport=6) / (b"u" * 300)))
    struct.pack_into("!H", udp_partial, 14 + 20 + 6, gso.pseudo_partial(4, udp_partial[14:34], 308) + 0)  # partial
    arp = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", type=0x0806) / (b"\0" * 28))
    seg = with_partial(tso_frame(False, b"t" * 1000, [], "PA", 1, 1))

    async def go():
        p = Pair()
        try:
            p.tap_in(gso.NO_VNET, arp)
            p.tap_in(gso.VNET.pack(gso.F_NEEDS_CSUM, 0, 0, 0, 34, 6), bytes(udp_partial))
            p.tap_in(gso.VNET.pack(gso.F_NEEDS_CSUM, 0, 0, 0, 34, 16), seg)
            p.tap_in(gso.NO_VNET, arp)
            assert [d[1] for d in p.wire] == [0, FMT_CSUM, FMT_CSUM | FMT_TCP, 0]
            out = await p.deliver()
            assert [f for _, f in out] == [arp, bytes(udp_partial), seg, arp]
            assert [v[0] for v, _ in out] == [0, gso.F_NEEDS_CSUM, gso.F_NEEDS_CSUM, 0]
            check_written(out[2:3])
        finally:
            p.close()
    run(go())


def test_per_packet_when_the_peer_does_not_take_offloads():
    """An older peer (or a bridge without TSO): TAP offloads stay off, a stray partial
    checksum is completed in software, no offload format on the wire."""
    seg = tso_frame(False, b"x" * 999, [], "PA", 5, 5)
    lay = gso.Layout(seg)
    partial = with_partial(seg)

    async def go():
        p = Pair(b_takes_offload=False)
        try:
            assert p.b.local_hints() == {} and not p.ta.tso and p.a.stats.mode == "per-packet/coalescing"
            p.tap_in(gso.VNET.pack(gso.F_NEEDS_CSUM, 0, 0, 0, lay.tcp_off, 16), bytes(partial))
            p.tap_in(tso_vnet(seg, 100), seg)                      # TSO must not happen: counted, not sent
            assert [d[1:4] for d in p.wire] == [b"\0\0\0"]
            assert p.a.stats.drops["gso_unexpected"] == 1
            out = await p.deliver()
            assert len(out) == 1 and out[0][0] == gso.NO_VNET and tcp_ok(out[0][1])
        finally:
            p.close()
    run(go())


def test_offload_format_refused_when_not_announced_and_reserved_bits():
    async def go():
        p = Pair(b_takes_offload=False)
        try:
            seg = tso_frame(False, b"y" * 100, [], "A", 1, 1)
            p.wire.append(p.sa.seal(seg, FMT_CSUM | FMT_TCP, 34))
            p.wire.append(p.sa.seal(seg, 0x80 | FMT_CSUM, 34))
            p.wire.append(p.sa.seal(seg, 0, 0)[:2] + b"\0\x01" + p.sa.seal(seg)[4:])   # reserved byte set
            p.wire.append(p.sa.seal(seg, FMT_CONT | FMT_CSUM, 34))       # CONT needs TCP
            out = await p.deliver()
            assert out == []
            assert p.b.stats.drops["offload_refused"] == 1 and p.b.stats.drops["malformed"] == 3
        finally:
            p.close()
    run(go())


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=0, max_value=255), st.integers(min_value=0, max_value=65535),
       st.one_of(st.binary(min_size=0, max_size=200),
                 st.builds(lambda v6, n, cut: tso_frame(v6, b"z" * n, [], "A", 1, 1)[:cut],
                           st.booleans(), st.integers(0, 3000), st.integers(0, 4000))))
def test_hostile_offload_format_from_an_authenticated_peer_is_refused_or_safe(fmt, cs, frame):
    """Whatever format byte, csum_start and frame a peer with the keys sends: b never raises,
    and what it writes passes check_vnet (or it counts a drop)."""
    async def go():
        p = Pair()
        try:
            p.wire.append(p.seal_raw(fmt, cs, frame))
            out = await p.deliver()
            for vnet, f in out:
                gso.check_vnet(vnet, f)
            assert len(out) + sum(p.b.stats.drops.values()) + len(p.controls) >= 1
        finally:
            p.close()
    run(go())


def test_interleaved_flows_and_a_gap_split_runs_but_keep_every_byte():
    f1 = tso_frame(False, bytes(range(256)) * 40, [], "A", 1000, 1)
    f2 = tso_frame(False, b"q" * 9000, [], "PA", 5, 9)
    f2 = f2[:14 + 20] + struct.pack("!H", 41000) + f2[14 + 22:]        # another source port

    async def go():
        p = Pair()
        try:
            p.tap_in(tso_vnet(f1, 1000), f1)
            p.tap_in(tso_vnet(f2, 1000), f2)
            wire = list(p.wire)
            # interleave the two flows' datagrams on the wire
            w1, w2 = wire[:11], wire[11:]
            p.wire[:] = [x for pair in zip(w1, w2) for x in pair] + w1[len(w2):] + w2[len(w1):]
            out = await p.deliver()
            check_written(out)
            by_port: dict[int, bytes] = {}
            for _, f in out:
                sport = struct.unpack_from("!H", f, 34)[0]
                by_port[sport] = by_port.get(sport, b"") + payload(f)
            assert by_port == {40000: payload(f1), 41000: payload(f2)}
        finally:
            p.close()
    run(go())


class _Proto(asyncio.DatagramProtocol):
    """aioice's protocol on a candidate's UDP socket, as far as the hook sees it: what it
    gets (STUN) is kept."""

    def __init__(self) -> None:
        self.stun: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.stun.append(data)


class GroPair:
    """A pair whose receiving end is hooked (ice.py) on a real UDP socket with GRO on, and
    a socket that sends to it as the peer's would (UDP GSO: glued on loopback)."""

    def __init__(self, p: Pair, proto: _Proto) -> None:
        self.p, self.proto = p, proto
        self.to = proto.transport.get_extra_info("sockname")
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    @classmethod
    async def make(cls) -> "GroPair":
        p = Pair()
        _, proto = await asyncio.get_running_loop().create_datagram_endpoint(_Proto, local_addr=("127.0.0.1", 0))
        ice.install_hook(proto, p.b.receive)
        assert ice.enable_gro(proto), "UDP_GRO refused (Linux >= 5.0 has it)"
        sock = proto.transport.get_extra_info("socket")
        assert sock.getsockopt(17, 104) == 1            # SOL_UDP, UDP_GRO: set on the real socket
        return cls(p, proto)

    async def send(self, datagrams: list[bytes]) -> None:
        """Send them in GSO groups and wait (at most 3 s) until each was taken, dropped or
        passed to aioice, then for the end-of-burst flush."""
        b = self.p.b.stats
        before = b.rx_packets + sum(b.drops.values()) + len(self.proto.stun)
        batch_io.send_batch(self.tx, datagrams, self.to)
        deadline = time.monotonic() + 3
        while (b.rx_packets + sum(b.drops.values()) + len(self.proto.stun) < before + len(datagrams)
               and time.monotonic() < deadline):
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)

    def close(self) -> None:
        self.tx.close()
        self.proto.transport.close()
        self.p.close()


@settings(max_examples=60, deadline=None)
@given(super_frames, st.booleans())
def test_gro_glued_datagrams_are_split_back(sf, stun_tail):
    """With UDP GRO a run of datagrams arrives as one buffer; it is cut at the segment size
    the kernel reports, a shorter last piece (a STUN message) goes to aioice."""
    v6, body, opts, flags, seq, ipid, mss = sf
    frame = tso_frame(v6, body, opts, flags, seq, ipid)

    async def go():
        g = await GroPair.make()
        p, proto = g.p, g.proto
        try:
            p.tap_in(tso_vnet(frame, mss), frame)
            glued = list(p.wire)
            stun = b"\x01\x01\x00\x00" + b"s" * 16
            tail = stun_tail and len(p.wire) > 1 and len(p.wire[-1]) == len(p.wire[0])
            if tail:
                glued.append(stun)
            p.wire[:] = []
            await g.send(glued)
            out = p.tb.frames()
            assert b"".join(payload(f) for _, f in out) == body
            assert proto.stun == ([stun] if tail else [])
            assert not p.b.stats.drops
        finally:
            g.close()
    run(go())


@settings(max_examples=60, deadline=None)
@given(super_frames, st.data())
def test_a_forged_or_replayed_piece_of_a_gro_burst_loses_only_itself(sf, data):
    """One receive loop handles a whole GRO burst: a piece with a flipped ciphertext bit
    (AEAD fails) or one replayed from an earlier burst is a counted drop, every other
    segment of the burst still arrives, coalesced and intact."""
    v6, body, opts, flags, seq, ipid, mss = sf
    k = max(3, min(40, len(body) // mss))           # whole segments: a GRO burst has equal pieces
    body = (body * (k * mss // len(body) + 1))[:k * mss]
    frame = tso_frame(v6, body, opts, flags, seq, ipid)

    async def go():
        g = await GroPair.make()
        p = g.p
        try:
            p.tap_in(tso_vnet(frame, mss), frame)
            wire = list(p.wire)
            p.wire[:] = []
            n = len(wire)
            assert n == k and len({len(w) for w in wire}) == 1
            bad = data.draw(st.integers(min_value=0, max_value=n - 1))
            forged = bytearray(wire[bad])
            forged[-1] ^= 0x01
            replay = data.draw(st.booleans())
            if replay:                                  # deliver it once first: the burst's copy is a replay
                await g.send([wire[bad]])
                burst = wire
            else:
                burst = wire[:bad] + [bytes(forged)] + wire[bad + 1:]
            await g.send(burst)
            out = p.tb.frames()
            kept = b"".join(body[i * mss:(i + 1) * mss] for i in range(n) if i != bad)
            got = b"".join(payload(f) for _, f in out)
            if replay:      # the piece came earlier, alone: it arrives first, then the rest
                assert got == body[bad * mss:(bad + 1) * mss] + kept
                assert p.b.stats.drops == {"replay": 1}
            else:
                assert got == kept
                assert p.b.stats.drops == {"auth": 1}
            check_written(out)
        finally:
            g.close()
    run(go())


@settings(max_examples=60, deadline=None)
@given(super_frames)
def test_fused_send_emits_exactly_segment_then_seal(sf):
    """The in-place segmentation + encrypt_into path sends the same bytes as the reference
    ``gso.segment`` + ``Session.seal`` (docs/tunnel.md format v2), counters included."""
    v6, data, opts, flags, seq, ipid, mss = sf
    frame = with_partial(tso_frame(v6, data, opts, flags, seq, ipid))
    p = Pair()
    try:
        p.sa.counter = 5
        ref = Session(*p.keys, 11, 22, initiator=True)                   # same keys as a
        ref.counter = 5
        cs = gso.Layout(frame).tcp_off
        want = [ref.seal(seg, CONT if i else SEG, cs) for i, seg in enumerate(gso.segment(frame, mss))]
        p.tap_in(tso_vnet(frame, mss), frame)
        assert p.wire == want
        assert p.sa.counter == ref.counter
    finally:
        p.close()


def test_fused_send_over_a_real_udp_socket_uses_gso_groups():
    """With a socket (the direct path) the segments leave as GSO sends of the reference bytes."""
    frame = with_partial(tso_frame(False, os.urandom(60000), [], "PA", 1000, 7))
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    p = Pair()
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)
        rx.settimeout(2.0)
        tx.setblocking(False)
        p.a.tx._sock, p.a.tx._addr = tx, rx.getsockname()
        ref = Session(*p.keys, 11, 22, initiator=True)
        want = [ref.seal(seg, CONT if i else SEG, gso.Layout(frame).tcp_off)
                for i, seg in enumerate(gso.segment(frame, 1348))]
        p.tap_in(tso_vnet(frame, 1348), frame)
        got = [rx.recv(65535) for _ in want]
        assert got == want
        assert not p.a.stats.drops and p.a.stats.tx_packets == len(want)
    finally:
        p.a.tx._sock = None
        p.close()
        rx.close()
        tx.close()


def test_no_continuation_marks_to_a_peer_that_did_not_announce_them():
    """A peer that takes offloads but not FMT_CONT (an earlier version) gets every segment
    in plain CSUM|TCP format, and still coalesces them."""
    frame = tso_frame(False, os.urandom(20000), [], "PA", 1, 1)

    async def go():
        p = Pair()
        try:
            assert p.b.local_hints() == {"offload": 1, "cont": 1} and p.a.tx.tx_cont
            p.a.set_peer_hints({"offload": 1})
            assert not p.a.tx.tx_cont and p.a.tx.tx_offload
            p.tap_in(tso_vnet(frame, 1000), frame)
            assert [d[1] for d in p.wire] == [SEG] * 20
            out = await p.deliver()
            assert b"".join(payload(f) for _, f in out) == payload(frame) and len(out) == 1
            check_written(out)
        finally:
            p.close()
    run(go())


@settings(max_examples=150, deadline=None)
@given(super_frames, st.one_of(
    st.binary(min_size=0, max_size=1600),
    st.builds(lambda v6, n, fl, cut: tso_frame(v6, b"w" * n, [], fl, 9, 9)[:cut],
              st.booleans(), st.integers(1, 1500), st.sampled_from(["A", "PA", "SA", "RA", "UA", "CA"]),
              st.integers(0, 1600))))
def test_a_false_continuation_from_an_authenticated_peer_is_safe(sf, bogus):
    """A peer with the keys marks anything as the next segment of a super-frame (FMT_CONT,
    next counter): b never raises, what it writes passes check_vnet, and the super-frame's
    own data arrives intact and first."""
    v6, body, opts, flags, seq, ipid, mss = sf
    frame = tso_frame(v6, body, opts, flags, seq, ipid)

    async def go():
        p = Pair()
        try:
            p.tap_in(tso_vnet(frame, mss), frame)
            p.wire.append(p.seal_raw(CONT, gso.Layout(frame).tcp_off, bogus))   # the next counter
            out = await p.deliver()
            for vnet, f in out:
                gso.check_vnet(vnet, f)
            check_written(out[:1])                         # the super-frame (bogus payload or not)
            assert payload(out[0][1]).startswith(body)
            assert len(out) + sum(p.b.stats.drops.values()) >= 2 or len(payload(out[0][1])) > len(body)
        finally:
            p.close()
    run(go())


class _GsoRecorder:
    """Stands in for the UDP socket of a path: records each send as (buffer, segment size,
    address); a GSO send's segment size comes from its UDP_SEGMENT control message."""

    def __init__(self, fail: bool = False) -> None:
        self.sends: list[tuple[bytes, int, tuple]] = []
        self.fail = fail
        self.closed = False

    def sendmsg(self, bufs, cmsgs, flags, addr):
        if self.fail:
            raise OSError(5, "EIO")
        (level, typ, val), = cmsgs
        assert (level, typ) == (batch_io.SOL_UDP, batch_io.UDP_SEGMENT)
        self.sends.append((b"".join(bytes(b) for b in bufs), struct.unpack("=H", val)[0], addr))

    def sendto(self, buf, addr):
        if self.fail:
            raise OSError(5, "EIO")
        self.sends.append((bytes(buf), len(buf), addr))

    def close(self):
        self.closed = True


def _chan(channel: int, dgram: bytes) -> bytes:
    return struct.pack("!HH", channel, len(dgram)) + dgram


@settings(max_examples=60, deadline=None)
@given(super_frames, st.integers(0x4000, 0x7FFF))
def test_relayed_gso_send_lays_out_channel_data_segments_in_one_buffer(sf, channel):
    """Through our own TURN allocation a super-frame's segments leave in GSO sends whose
    buffer is the data packets back to back, each behind its 4-byte ChannelData header
    (channel, its own length): every segment but the last of a send of the GSO size, so the
    kernel cuts it into the ChannelData datagrams TURN expects (docs/tunnel.md §4)."""
    v6, data, opts, flags, seq, ipid, mss = sf
    frame = with_partial(tso_frame(v6, data, opts, flags, seq, ipid))
    p = Pair()
    rec = _GsoRecorder()
    try:
        p.a.tx._sock, p.a.tx._addr, p.a.tx._chan = rec, ("198.18.0.2", 3478), channel
        ref = Session(*p.keys, 11, 22, initiator=True)
        want = [ref.seal(seg, CONT if i else SEG, gso.Layout(frame).tcp_off)
                for i, seg in enumerate(gso.segment(frame, mss))]
        p.tap_in(tso_vnet(frame, mss), frame)
        got = []
        for buf, size, addr in rec.sends:
            assert addr == ("198.18.0.2", 3478)
            pieces = [buf[o:o + size] for o in range(0, len(buf), size)]
            assert len(buf) <= batch_io.GSO_MAX_BYTES and len(pieces) <= batch_io.GSO_MAX_SEGMENTS
            assert all(len(x) == size for x in pieces[:-1]) and 0 < len(pieces[-1]) <= size
            got += pieces
        assert got == [_chan(channel, d) for d in want]
        assert not p.wire and not p.a.stats.drops
    finally:
        p.a.tx._sock = None
        p.close()


def test_relayed_gso_send_over_a_real_socket_and_its_per_datagram_fallback():
    """The kernel cuts a relayed GSO send into ChannelData datagrams of the reference bytes;
    when the socket refuses GSO the same segments go one by one through the path's send
    function (which frames them itself), without a second header."""
    frame = with_partial(tso_frame(False, os.urandom(60000), [], "PA", 1000, 7))
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    p = Pair()
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)
        rx.settimeout(2.0)
        tx.setblocking(False)
        p.a.tx._sock, p.a.tx._addr, p.a.tx._chan = tx, rx.getsockname(), 0x4001
        ref = Session(*p.keys, 11, 22, initiator=True)
        cs = gso.Layout(frame).tcp_off
        want = [ref.seal(seg, CONT if i else SEG, cs) for i, seg in enumerate(gso.segment(frame, 1348))]
        p.tap_in(tso_vnet(frame, 1348), frame)
        assert [rx.recv(65535) for _ in want] == [_chan(0x4001, d) for d in want]
        assert not p.a.stats.drops
        # GSO refused: the rest goes through the path's own send function, unframed here
        p.a.tx._sock, p.a.tx._chan = _GsoRecorder(fail=True), 0x4001
        again = [ref.seal(seg, CONT if i else SEG, cs) for i, seg in enumerate(gso.segment(frame, 1348))]
        p.tap_in(tso_vnet(frame, 1348), frame)
        assert p.wire == again
        assert p.a.stats.drops["gso_send_error"] == 1 and p.a.tx._chan == -1 and p.a.tx._sock is None
    finally:
        p.a.tx._sock = None
        p.close()
        rx.close()
        tx.close()


def test_single_datagrams_of_one_wakeup_reach_the_receiver_as_one_burst():
    """Datagrams that arrive one by one (a TURN relay sends them so; no GRO glued them) are
    laid back to back by the socket hook and handed to the receiver as one burst per
    wake-up: every byte arrives, in order around a STUN message in the middle, in a few
    receive calls rather than one per datagram."""
    frame = tso_frame(False, os.urandom(40000), [], "PA", 5, 5)

    async def go():
        p = Pair()
        calls = []

        def counted(data, seg, addr, protocol, other):
            calls.append((len(data), seg))
            p.b.receive(data, seg, addr, protocol, other)
        _, proto = await asyncio.get_running_loop().create_datagram_endpoint(_Proto, local_addr=("127.0.0.1", 0))
        ice.install_hook(proto, counted)
        to = proto.transport.get_extra_info("sockname")
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            p.tap_in(tso_vnet(frame, 1000), frame)
            wire, p.wire[:] = list(p.wire), []
            stun = b"\x01\x01\x00\x00" + b"s" * 16
            for i, d in enumerate(wire):
                tx.sendto(d, to)
                if i == 10:
                    tx.sendto(stun, to)
            deadline = time.monotonic() + 3
            while p.b.stats.rx_packets < len(wire) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0)
            out = p.tb.frames()
            assert b"".join(payload(f) for _, f in out) == payload(frame)
            assert proto.stun == [stun] and not p.b.stats.drops
            assert sum(n // s + (n % s > 0) for n, s in calls) == len(wire)
            assert len(calls) <= 4, calls           # 11 before the STUN message, 29 after (one or two wake-ups)
        finally:
            tx.close()
            proto.transport.close()
            p.close()
    run(go())
