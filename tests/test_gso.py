"""Property tests of TCP segmentation/coalescing and of offload-header validation."""

from __future__ import annotations

import struct

from hypothesis import assume, given, settings, strategies as st
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


def _frame(v6: bool, payload: bytes, opts, flags: str, seq: int, ipid: int) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                 / (IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="100.96.0.1", dst="100.96.0.2", id=ipid, flags="DF"))
                 / TCP(sport=40000, dport=5201, seq=seq, ack=12345, flags=flags, window=500, options=opts)
                 / payload)


_fields = dict(
    v6=st.booleans(),
    opts=st.sampled_from([[], [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]]),
    flags=st.sampled_from(["A", "PA", "FPA", "CA", "CPA", "EA"]),
    seq=st.integers(min_value=0, max_value=2**32 - 1),
    ipid=st.integers(min_value=0, max_value=65535),
)
frames = st.builds(
    lambda v6, payload, mss, opts, flags, seq, ipid: (_frame(v6, payload, opts, flags, seq, ipid), mss),
    payload=st.binary(min_size=1, max_size=20000),
    mss=st.integers(min_value=200, max_value=1448),
    **_fields,
)
# frames of three segments or more: an MSS at most a third of the payload
multi_segment_frames = st.builds(
    lambda v6, payload, k, opts, flags, seq, ipid: (_frame(v6, payload, opts, flags, seq, ipid),
                                                    max(1, len(payload) // k)),
    payload=st.binary(min_size=600, max_size=20000),
    k=st.integers(min_value=3, max_value=40),
    **_fields,
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
@given(multi_segment_frames, st.data())
def test_a_lost_segment_loses_only_itself(fm, data):
    frame, mss = fm
    segs = gso.segment(frame, mss)
    assume(len(segs) >= 3)
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


REASONS = {"bad_vnet_len", "bad_vnet_flags", "bad_frame_len", "bad_csum_offsets", "bad_gso",
           "bad_gso_type", "gso_type_mismatch", "bad_gso_offsets", "bad_gso_size", "bad_ip_len",
           "short_frame", "not_ip", "not_tcp", "bad_ip", "bad_tcp"}

# Headers that are almost right (one field off) as well as any 10 bytes.
_tcp_frame = bytes(Ether() / IP(src="100.96.0.1", dst="100.96.0.2") / TCP(flags="A") / (b"x" * 3000))
_lay = gso.Layout(_tcp_frame)
vnet_headers = st.one_of(
    st.binary(min_size=10, max_size=10),
    st.builds(gso.VNET.pack,
              st.sampled_from([0, gso.F_NEEDS_CSUM, gso.F_DATA_VALID, gso.F_NEEDS_CSUM | 0x80]),
              st.sampled_from([gso.GSO_NONE, gso.GSO_TCPV4, gso.GSO_TCPV6, gso.GSO_TCPV4 | gso.GSO_ECN, 3]),
              st.sampled_from([0, _lay.payload_off, _lay.payload_off - 1]),
              st.sampled_from([0, 1, 1000, 2999, 3000, 3001, 65535]),
              st.sampled_from([0, 13, _lay.tcp_off, _lay.ip_off]),
              st.sampled_from([0, 6, 16, 17])))
offload_frames = st.one_of(st.binary(max_size=300), st.just(_tcp_frame),
                           st.builds(lambda n: _tcp_frame[:n], st.integers(14, len(_tcp_frame))))


@settings(max_examples=1000, deadline=None)
@given(vnet_headers, offload_frames)
def test_hostile_offload_headers_are_refused_or_describe_the_frame(vnet, frame):
    """Anything but an OffloadError is a crash; what is accepted describes the frame as the
    kernel needs it (what a TAP write of it would otherwise break on)."""
    try:
        gso.check_vnet(vnet, frame)
    except gso.OffloadError as e:
        assert e.reason in REASONS, e.reason
        return
    flags, gtype, hdr_len, gso_size, cs, co = gso.VNET.unpack(vnet)
    assert not flags & ~(gso.F_NEEDS_CSUM | gso.F_DATA_VALID)
    assert gso.ETH_LEN <= len(frame) <= gso.MAX_GSO_FRAME
    if flags & gso.F_NEEDS_CSUM:
        assert cs >= gso.ETH_LEN and co in (6, 16) and cs + co + 2 <= len(frame)
    if gtype & ~gso.GSO_ECN == gso.GSO_NONE:
        assert gso_size == 0 and len(frame) <= 9216 + gso.ETH_LEN
        return
    lay = gso.Layout(frame)
    assert gtype & ~gso.GSO_ECN == (gso.GSO_TCPV4 if lay.ver == 4 else gso.GSO_TCPV6)
    assert flags & gso.F_NEEDS_CSUM and (hdr_len, cs, co) == (lay.payload_off, lay.tcp_off, 16)
    assert 1 <= gso_size < len(frame) - hdr_len          # more than one segment's payload
    assert Ether(frame)[IP].len == len(frame) - gso.ETH_LEN


def test_gso_size_must_leave_more_than_one_segment():
    """A GSO frame carries more than gso_size bytes of payload (else it is one segment and
    has no business being GSO): exactly gso_size is refused, one byte more is accepted."""
    plen = len(_tcp_frame) - _lay.payload_off

    def check(size: int) -> str:
        vh = gso.VNET.pack(gso.F_NEEDS_CSUM, gso.GSO_TCPV4, _lay.payload_off, size, _lay.tcp_off, 16)
        try:
            gso.check_vnet(vh, _tcp_frame)
        except gso.OffloadError as e:
            return e.reason
        return "ok"

    assert check(plen - 1) == "ok"
    assert check(plen) == "bad_gso_size"
    assert check(plen + 1) == "bad_gso_size"
    assert check(1) == "ok"
    assert check(0) == "bad_gso_size"


def test_hostile_offload_header_examples():
    good = bytes(Ether() / IP(src="100.96.0.1", dst="100.96.0.2") / TCP(flags="A") / (b"x" * 4000))
    lay = gso.Layout(good)
    ok = gso.VNET.pack(gso.F_NEEDS_CSUM, gso.GSO_TCPV4, lay.payload_off, 1000, lay.tcp_off, 16)
    assert gso.check_vnet(ok, good) is None                 # accepted (a refusal raises)
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
