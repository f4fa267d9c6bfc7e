"""The tunnel's packet codec and replay window: property tests (hypothesis) and a bounded
fuzz run of the receive parser (every input is either accepted or a counted drop)."""

from __future__ import annotations

import os

from hypothesis import given, settings, strategies as st

from ipop_switch.tunnel import codec
from ipop_switch.tunnel.datapath import Datapath
from ipop_switch.tunnel.session import Session
from ipop_switch.tunnel.stats import Stats

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
k32 = st.binary(min_size=32, max_size=32)


@given(u32, k32, st.binary(min_size=48, max_size=48), st.binary(min_size=28, max_size=28))
def test_initiation_roundtrip(sender, e, s, p):
    m = codec.Initiation(sender, e, s, p)
    b = codec.encode_initiation(m)
    assert len(b) == codec.INIT_LEN and codec.decode_initiation(b) == m


@given(u32, u32, k32, st.binary(min_size=24, max_size=24))
def test_response_roundtrip(sender, receiver, e, p):
    m = codec.Response(sender, receiver, e, p)
    b = codec.encode_response(m)
    assert len(b) == codec.RESP_LEN and codec.decode_response(b) == m


@given(u32, u64, st.binary(max_size=64))
def test_data_header_roundtrip(receiver, counter, tail):
    b = codec.encode_data_header(receiver, counter) + bytes(codec.TAG_LEN) + tail
    h = codec.decode_data_header(b)
    assert h == codec.DataHeader(receiver, counter)


# any bytes, and bytes that start like one of our packets (type, zero or not, near the sizes)
packets = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda t, z, n, tail: (bytes([t]) + z + tail)[:n],
              st.sampled_from(sorted(codec.OUR_TYPES) + [0x01]),
              st.sampled_from([b"\0\0\0", b"\0\1\0"]),
              st.sampled_from([codec.DATA_MIN_LEN - 1, codec.DATA_MIN_LEN, codec.RESP_LEN, codec.INIT_LEN,
                               codec.INIT_LEN + 1, 200]),
              st.binary(min_size=200, max_size=200)))


@settings(max_examples=500)
@given(packets)
def test_decoders_take_exactly_their_format(b):
    """Each decoder returns None unless the bytes are its packet (type byte, three zero
    bytes, the length), and what it returns encodes back to the same bytes."""
    zero = b[1:4] == b"\0\0\0"
    init = codec.decode_initiation(b)
    assert (init is not None) == (len(b) == codec.INIT_LEN and b[0] == codec.TYPE_INIT and zero)
    if init is not None:
        assert codec.encode_initiation(init) == b
    resp = codec.decode_response(b)
    assert (resp is not None) == (len(b) == codec.RESP_LEN and b[0] == codec.TYPE_RESP and zero)
    if resp is not None:
        assert codec.encode_response(resp) == b
    hdr = codec.decode_data_header(b)
    assert (hdr is not None) == (len(b) >= codec.DATA_MIN_LEN and b[0] == codec.TYPE_DATA and zero)
    if hdr is not None:
        assert codec.encode_data_header(hdr.receiver, hdr.counter) == b[:codec.DATA_HEADER_LEN]


def test_type_bytes_clear_of_stun_dtls_turn():
    for t in codec.OUR_TYPES:
        assert not (0 <= t <= 3 or 20 <= t <= 63 or 64 <= t <= 79 or 128 <= t <= 191)


class Model:
    """Reference: a counter is accepted iff never accepted before and > highest - size."""

    def __init__(self, size):
        self.size, self.seen, self.highest = size, set(), -1

    def update(self, c):
        if c in self.seen or c <= self.highest - self.size:
            return False
        self.seen.add(c)
        self.highest = max(self.highest, c)
        return True


@settings(max_examples=300)
@given(st.integers(1, 300), st.lists(st.integers(0, 2000), max_size=300))
def test_replay_window_matches_model(size, counters):
    w, m = codec.ReplayWindow(size), Model(size)
    for c in counters:
        assert w.check(c) == (c not in m.seen and c > m.highest - m.size)
        assert w.update(c) == m.update(c), (size, c)


@given(st.lists(st.integers(0, 2**64 - 1), max_size=50))
def test_replay_window_never_accepts_twice(counters):
    w = codec.ReplayWindow()
    accepted = [c for c in counters if w.update(c)]
    assert len(accepted) == len(set(accepted))
    assert all(not w.update(c) for c in accepted)


def test_replay_window_refuses_beyond_counter_limit():
    w = codec.ReplayWindow()
    assert not w.update(codec.REJECT_AFTER_MESSAGES + 1)
    assert w.update(codec.REJECT_AFTER_MESSAGES)


def _pair():
    k1, k2 = os.urandom(32), os.urandom(32)
    a = Session(k1, k2, 11, 22, initiator=True)
    b = Session(k2, k1, 22, 11, initiator=True)
    return a, b


def _receiver(session):
    import socket
    rs, ws = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)    # keeps frame boundaries, like a TAP
    r, w = rs.detach(), ws.detach()
    os.set_blocking(w, False)
    os.set_blocking(r, False)
    controls = []
    dp = Datapath(w, Stats(), lambda s, p: controls.append(p), lambda d, p, a: controls.append(("hs", d)))
    dp.table.by_index[session.local_index] = session
    return dp, r, w, controls


@given(st.lists(st.binary(min_size=14, max_size=1500), min_size=1, max_size=20))
def test_seal_open_frames_in_order_and_replays_dropped(frames):
    a, b = _pair()
    dp, r, w, _ = _receiver(b)
    try:
        pkts = [a.seal(f) for f in frames]
        for p in pkts:
            dp.datagram(p, ("x", 1), None)
        got = [os.read(r, 2000) for _ in frames]
        assert got == frames
        for p in pkts:
            dp.datagram(p, ("x", 1), None)
        assert dp.stats.drops["replay"] == len(frames) and dp.stats.rx_frames == len(frames)
    finally:
        os.close(r), os.close(w)


@settings(max_examples=200)
@given(st.binary(min_size=14, max_size=200), st.integers(0, 10_000), st.integers(1, 255))
def test_any_bit_flip_or_truncation_is_dropped(frame, pos, flip):
    a, b = _pair()
    dp, r, w, controls = _receiver(b)
    try:
        p = bytearray(a.seal(frame))
        i = pos % len(p)
        p[i] ^= flip
        dp.datagram(bytes(p), ("x", 1), None)
        dp.datagram(a.seal(frame)[: pos % codec.DATA_MIN_LEN], ("x", 1), None) if pos % codec.DATA_MIN_LEN else None
        assert dp.stats.rx_frames == 0
        # a changed type byte goes to the handshake handler (which counts it), the rest are drops here
        assert sum(dp.stats.drops.values()) + len(controls) >= 1
    finally:
        os.close(r), os.close(w)


def test_fuzz_receive_parser_bounded():
    """10,000 random and mutated datagrams: no exception, nothing reaches the TAP, all counted."""
    import random
    rnd = random.Random(1234)
    a, b = _pair()
    dp, r, w, controls = _receiver(b)
    good = a.seal(b"\x00" * 60)
    try:
        n = 0
        for i in range(10_000):
            kind = i % 4
            if kind == 0:
                d = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 120)))
                d = bytes([codec.TYPE_DATA]) + d[1:] if rnd.random() < 0.5 else d
            elif kind == 1:
                d = bytearray(good)
                for _ in range(rnd.randrange(1, 4)):
                    d[rnd.randrange(len(d))] = rnd.getrandbits(8)
                d = bytes(d)
            elif kind == 2:
                d = good[: rnd.randrange(1, len(good))]
            else:
                d = codec.encode_data_header(b.local_index, rnd.getrandbits(64)) + os.urandom(rnd.randrange(16, 80))
            if d == good:
                continue
            dp.datagram(d, ("x", 1), None)
            n += 1
        assert dp.stats.rx_frames == 0
        handed_to_handshake = sum(1 for c in controls if isinstance(c, tuple))
        assert sum(dp.stats.drops.values()) + handed_to_handshake == n
    finally:
        os.close(r), os.close(w)
