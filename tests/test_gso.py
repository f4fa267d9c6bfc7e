"""Property tests of TCP segmentation/coalescing and of offload-header validation."""

from __future__ import annotations

import struct

from hypothesis import given, settings, strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from ipop_switch.tunnel import gso


def complete_checksum(frame: bytes, csum_start: int, csum_offset: int) -> bytes:
    """What the kernel does with NEEDS_CSUM: sum from csum_start (field holds the partial), store ~sum."""
    b = bytearray(frame)
    data = bytes(b[csum_start:]) + (b"\0" if (len(b) - csum_start) & 1 else b"")
    s = sum(w for (w,) in struct.iter_unpack("!H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", b, csum_start + csum_offset, (~s) & 0xFFFF or 0xFFFF)
    return bytes(b)


def tcp_ok(frame: bytes) -> bool:
    pkt = Ether(frame)
    l4 = pkt[TCP]
    got = l4.chksum
    del l4.chksum
    if IP in pkt:
        del pkt[IP].chksum
    want = Ether(bytes(pkt))[TCP].chksum
    # 0x0000 and 0xFFFF are both zero in ones' complement: the kernel (and complete_checksum)
    # writes a sum of zero as 0xFFFF, scapy as 0x0000; a receiver's check accepts either
    return got == want or {got, want} == {0, 0xFFFF}


frames = st.builds(
    lambda v6, payload, mss, opts, flags, seq, ipid: (
        bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
              / (IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="100.96.0.1", dst="100.96.0.2", id=ipid, flags="DF"))
              / TCP(sport=40000, dport=5201, seq=seq, ack=12345, flags=flags, window=500, options=opts)
              / payload),
        mss,
    ),
    v6=st.booleans(),
    payload=st.binary(min_size=1, max_size=20000),
    mss=st.integers(min_value=200, max_value=1448),
    opts=st.sampled_from([[], [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]]),
    flags=st.sampled_from(["A", "PA", "FPA", "CA", "CPA", "EA"]),
    seq=st.integers(min_value=0, max_value=2**32 - 1),
    ipid=st.integers(min_value=0, max_value=65535),
)


def payload_of(frame: bytes) -> bytes:
    lay = gso.Layout(frame)
    return frame[lay.payload_off:]


@settings(max_examples=150, deadline=None)
@given(frames)
def test_segment_then_coalesce_round_trips(fm):
    frame, mss = fm
    lay = gso.Layout(frame)
    segs = gso.segment(frame, mss)
    assert b"".join(payload_of(bytes(s)) for s in segs) == frame[lay.payload_off:]
    assert all(len(payload_of(bytes(s))) == mss for s in segs[:-1])
    flags = frame[lay.tcp_off + 13]
    for i, s in enumerate(segs):
        f = s[lay.tcp_off + 13]
        assert bool(f & gso.TCP_CWR) == (i == 0 and bool(flags & gso.TCP_CWR))
        assert bool(f & gso.TCP_PSH) == (i == len(segs) - 1 and bool(flags & gso.TCP_PSH))
        assert bool(f & gso.TCP_FIN) == (i == len(segs) - 1 and bool(flags & gso.TCP_FIN))
        assert tcp_ok(complete_checksum(bytes(s), lay.tcp_off, 16))
        if lay.ver == 4:
            assert Ether(bytes(s))[IP].id == (Ether(frame)[IP].id + i) & 0xFFFF
            ip = Ether(bytes(s))[IP]
            c = ip.chksum
            del ip.chksum
            assert IP(bytes(ip))[IP].chksum == c
    out = gso.coalesce(segs)
    assert len(out) == 1
    vnet, merged = out[0]
    gso.check_vnet(vnet, merged)
    assert payload_of(merged) == frame[lay.payload_off:]
    flags_, gtype, hdr_len, gsize, cstart, coff = gso.VNET.unpack(vnet)
    assert flags_ == gso.F_NEEDS_CSUM and cstart == lay.tcp_off and coff == 16
    if len(segs) > 1:
        assert gtype == (gso.GSO_TCPV6 if lay.ver == 6 else gso.GSO_TCPV4) and gsize == mss
    assert tcp_ok(complete_checksum(merged, cstart, coff))
    # headers are the original's but for the checksum field
    a, b = bytearray(merged[:lay.payload_off]), bytearray(frame[:lay.payload_off])
    a[lay.tcp_off + 16:lay.tcp_off + 18] = b[lay.tcp_off + 16:lay.tcp_off + 18] = b"\0\0"
    assert a == b


@settings(max_examples=100, deadline=None)
@given(frames, st.data())
def test_a_lost_segment_loses_only_itself(fm, data):
    frame, mss = fm
    segs = gso.segment(frame, mss)
    if len(segs) < 3:
        return
    lost = data.draw(st.integers(min_value=0, max_value=len(segs) - 1))
    kept = segs[:lost] + segs[lost + 1:]
    out = gso.coalesce(kept)
    assert len(out) <= 2
    assert b"".join(payload_of(f) for _, f in out) == b"".join(payload_of(bytes(s)) for s in kept)
    for vnet, f in out:
        gso.check_vnet(vnet, f)


def test_interleaved_flows_are_not_merged_and_keep_order():
    def frame(sport, payload, seq):
        return bytes(Ether() / IP(src="100.96.0.1", dst="100.96.0.2") / TCP(sport=sport, dport=80, seq=seq, flags="A") / payload)
    a = gso.segment(frame(1000, b"a" * 3000, 1), 1000)
    b = gso.segment(frame(2000, b"b" * 3000, 1), 1000)
    out = gso.coalesce([a[0], a[1], b[0], b[1], b[2], a[2]])
    assert [payload_of(f)[:1] * 0 + bytes([payload_of(f)[0]]) for _, f in out] == [b"a", b"b", b"a"]
    assert [len(payload_of(f)) for _, f in out] == [2000, 3000, 1000]


def test_non_tcp_passes_through_unmerged():
    udp = bytes(Ether() / IP(src="100.96.0.1", dst="100.96.0.2", proto=17) / (b"\0" * 28))
    assert gso.coalesce([udp]) == [(gso.NO_VNET, udp)]


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=10, max_size=10), st.binary(min_size=0, max_size=300))
def test_hostile_offload_headers_are_refused_not_crashing(vnet, frame):
    try:
        gso.check_vnet(vnet, frame)
    except gso.OffloadError as e:
        assert e.reason


def test_hostile_offload_header_examples():
    good = bytes(Ether() / IP(src="100.96.0.1", dst="100.96.0.2") / TCP(flags="A") / (b"x" * 4000))
    lay = gso.Layout(good)
    ok = gso.VNET.pack(gso.F_NEEDS_CSUM, gso.GSO_TCPV4, lay.payload_off, 1000, lay.tcp_off, 16)
    gso.check_vnet(ok, good)
    bad = {
        "bad_gso_type": gso.VNET.pack(gso.F_NEEDS_CSUM, 9, lay.payload_off, 1000, lay.tcp_off, 16),
        "gso_type_mismatch": gso.VNET.pack(gso.F_NEEDS_CSUM, gso.GSO_TCPV6, lay.payload_off, 1000, lay.tcp_off, 16),
        "bad_csum_offsets": gso.VNET.pack(gso.F_NEEDS_CSUM, gso.GSO_TCPV4, lay.payload_off, 1000, 60000, 16),
        "bad_gso_size": gso.VNET.pack(gso.F_NEEDS_CSUM, gso.GSO_TCPV4, lay.payload_off, 0, lay.tcp_off, 16),
        "bad_gso_offsets": gso.VNET.pack(gso.F_NEEDS_CSUM, gso.GSO_TCPV4, 20, 1000, lay.tcp_off, 16),
        "bad_vnet_flags": gso.VNET.pack(0x80, gso.GSO_NONE, 0, 0, 0, 0),
    }
    for reason, vnet in bad.items():
        try:
            gso.check_vnet(vnet, good)
        except gso.OffloadError as e:
            assert e.reason == reason, (reason, e.reason)
        else:
            raise AssertionError(f"{reason} accepted")
    # a GSO header on a frame whose IP length lies
    lying = bytearray(good)
    struct.pack_into("!H", lying, 16, 100)
    try:
        gso.check_vnet(ok, bytes(lying))
    except gso.OffloadError as e:
        assert e.reason == "bad_ip_len"
    else:
        raise AssertionError("lying IP length accepted")
