"""The datapath's C loops (ipop_switch/tunnel/_fastpath.c) against the Python code they
replace: the same replay window, and a receiver with the C loops writes exactly what one
without them writes, for any mix of segments, loss, reordering, replays, forgeries and
stripped continuation marks, per datagram or glued into GRO bursts. (The sending side:
tests/test_datapath.py runs every test with both loops, and the fused send must equal
``gso.segment`` + ``Session.seal`` byte for byte.)"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from ipop_switch.tunnel import accel, codec, gso
from ipop_switch.tunnel.codec import FMT_CONT
from ipop_switch.tunnel.datapath import Datapath
from ipop_switch.tunnel.session import Session
from ipop_switch.tunnel.stats import Stats

from helpers.seq_tap import SeqTap
from test_datapath import SEG, tso_frame, with_partial

# the extension itself, also when IPSW_NO_ACCEL keeps the datapath off it (an ImportError
# here means it was not built: bootstrap.sh installs what building it needs)
fp = accel.fastpath or importlib.import_module("ipop_switch.tunnel._fastpath")


def _accel_in_a_fresh_process(no_accel: bool) -> dict:
    """What ``accel`` decides at import, in a new interpreter (the decision is made once)."""
    env = {k: v for k, v in os.environ.items() if k != "IPSW_NO_ACCEL"}
    if no_accel:
        env["IPSW_NO_ACCEL"] = "1"
    code = ("import json; from ipop_switch.tunnel import accel; "
            "from ipop_switch.tunnel.session import Session; "
            "s = Session(bytes(32), bytes(32), 1, 2, initiator=True); "
            "print(json.dumps({'name': accel.name(), 'c_keys': s.tx_fast is not None}))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_datapath_runs_the_c_loops_unless_told_not_to():
    """``accel.name()`` (what ``status`` shows) says "c" exactly when sessions get the C
    keys, and IPSW_NO_ACCEL turns them off with the reason."""
    assert _accel_in_a_fresh_process(no_accel=False) == {"name": "c", "c_keys": True}
    assert _accel_in_a_fresh_process(no_accel=True) == {
        "name": "python (turned off by IPSW_NO_ACCEL)", "c_keys": False}


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=200),
       st.lists(st.one_of(st.integers(min_value=0, max_value=600),
                          st.integers(min_value=codec.REJECT_AFTER_MESSAGES - 3,
                                      max_value=codec.REJECT_AFTER_MESSAGES + 3),
                          st.integers(min_value=2**64 - 2, max_value=2**66)), max_size=200))
def test_the_replay_window_in_c_is_the_python_one(size, counters):
    c, py = fp.RxState(os.urandom(32), size), codec.ReplayWindow(size)
    for x in counters:
        assert c.check(x) == py.check(x), x
        assert c.update(x) == py.update(x), x
        assert c.highest == py.highest
    assert c.size == size


def test_the_c_loops_refuse_bad_arguments_without_crashing():
    with pytest.raises(ValueError):
        fp.TxKey(b"short")
    with pytest.raises(ValueError):
        fp.RxState(os.urandom(32), 0)
    k = fp.TxKey(os.urandom(32))
    frame = with_partial(tso_frame(False, b"x" * 3000, [], "A", 1, 1))
    out = bytearray(8000)
    with pytest.raises(ValueError):                                  # payload offset past the frame
        k.seal_tcp(frame, len(frame) + 1, 34, 1000, 0, 1, 0, b"\0" * 8, b"\0" * 8, out)
    with pytest.raises(ValueError):                                  # segment range beyond the frame
        k.seal_tcp(frame, 54, 34, 1000, 0, 9, 0, b"\0" * 8, b"\0" * 8, out)
    with pytest.raises(ValueError):                                  # output too small
        k.seal_tcp(frame, 54, 34, 1000, 0, 3, 0, b"\0" * 8, b"\0" * 8, bytearray(100))
    rx = fp.FastRx()
    with pytest.raises(ValueError):
        rx.open_burst(fp.RxState(os.urandom(32)), b"abc", b"\xe3" * 64, 0, 64, [])
    assert rx.open_burst(fp.RxState(os.urandom(32)), b"abcd", b"\xe3" * 64, 0, 64, []) == (0, 0, None, 0, 0, 0)


def receiver(keys: tuple[bytes, bytes], c_loops: bool) -> tuple[Datapath, SeqTap]:
    """A receiving datapath (session index 22) with or without the C loops."""
    saved = accel.fastpath
    accel.fastpath = fp if c_loops else None
    try:
        tap = SeqTap()
        dp = Datapath(tap.fd, Stats(), lambda s, p: None, lambda *a: None, tap=tap)
        s = Session(keys[1], keys[0], 22, 11, initiator=True)
        dp.table.current = dp.table.by_index[22] = s
        dp.set_peer_hints({"offload": 1, "cont": 1})
        return dp, tap
    finally:
        accel.fastpath = saved


def wire_of(keys, flows: list[tuple[int, bytes, str, int]]) -> list[bytes]:
    """Data packets as a peer sends them: each (flow, payload, flags, mss) as one super-frame's
    segments (marked FMT_CONT after the first), flows' sequence numbers running on."""
    tx = Session(keys[0], keys[1], 11, 22, initiator=True)
    seqs: dict[int, int] = {}
    out = []
    for flow, body, flags, mss in flows:
        seq = seqs.get(flow, 1000 * flow)
        f = bytearray(with_partial(tso_frame(flow % 2 == 1, body, [], flags, seq, 7)))
        f[36 + (20 if flow % 2 else 0)] ^= flow          # the port tells flows apart
        f = with_partial(bytes(f))
        seqs[flow] = seq + len(body)
        cs = gso.Layout(f).tcp_off
        for i, seg in enumerate(gso.segment(f, mss)):
            out.append(tx.seal(seg, SEG | (FMT_CONT if i else 0), cs))
    return out


def perturb(wire: list[bytes], ops: list[tuple[str, int]]) -> list[bytes]:
    w = list(wire)
    for op, i in ops:
        if not w:
            break
        i %= len(w)
        if op == "drop":
            del w[i]
        elif op == "dup":
            w.insert(min(len(w), i + 3), w[i])
        elif op == "swap" and i + 1 < len(w):
            w[i], w[i + 1] = w[i + 1], w[i]
        elif op == "forge":
            b = bytearray(w[i])
            b[-1] ^= 1
            w[i] = bytes(b)
        elif op == "unmark":                             # a CONT mark gone (needs a new tag: forged)
            b = bytearray(w[i])
            b[1] &= ~FMT_CONT
            w[i] = bytes(b)
    return w


def bursts(wire: list[bytes], glue: bool) -> list[tuple[bytes, int]]:
    """What the socket hands over: single datagrams, or runs of equal-size ones glued as UDP GRO
    does (each ``seg`` bytes but the last, which may be shorter)."""
    if not glue:
        return [(d, len(d)) for d in wire]
    out, i = [], 0
    while i < len(wire):
        j, size = i + 1, len(wire[i])
        while j < len(wire) and j - i < 40 and len(wire[j]) == size:
            j += 1
        if j < len(wire) and j - i < 40 and len(wire[j]) < size:
            j += 1
        out.append((b"".join(wire[i:j]), size))
        i = j
    return out


_BYTES = bytes(range(256)) * 50
# (flow, payload, flags, mss): payloads often a whole number of segments, so that a run stays
# open into the flow's next super-frame and the rules for joining it are exercised
flows = st.lists(st.builds(
    lambda flow, nseg, tail, flags, mss: (flow, _BYTES[:nseg * mss + tail], flags, mss),
    st.integers(min_value=0, max_value=2), st.integers(min_value=0, max_value=8),
    st.sampled_from([0, 0, 1, 100]), st.sampled_from(["A", "PA", "FA", "CA", "SA", "RA", "UA", "EA"]),
    st.sampled_from([200, 536, 1000, 1448])), min_size=1, max_size=8)
ops = st.lists(st.tuples(st.sampled_from(["drop", "dup", "swap", "forge", "unmark"]),
                         st.integers(min_value=0, max_value=10_000)), max_size=6)


@settings(max_examples=400, deadline=None)
@given(flows, ops, st.booleans(), st.integers(min_value=1, max_value=3))
def test_the_c_receive_loop_writes_what_the_python_one_writes(fl, perturbations, glue, flush_every):
    keys = (os.urandom(32), os.urandom(32))
    wire = perturb(wire_of(keys, fl), perturbations)
    got = []

    async def go():
        for c_loops in (True, False):
            dp, tap = receiver(keys, c_loops)
            try:
                for k, (data, seg) in enumerate(bursts(wire, glue)):
                    dp.receive(data, seg, ("198.18.0.9", 1), None, None)
                    if k % flush_every == 0:
                        await asyncio.sleep(0)                       # the end-of-burst flush
                await asyncio.sleep(0)
                got.append(([(v, bytes(f)) for v, f in tap.frames()], dict(dp.stats.drops),
                            dp.stats.rx_packets, dp.stats.rx_coalesced))
            finally:
                tap.close()

    asyncio.run(go())
    assert got[0] == got[1]


def test_a_run_in_c_and_frames_from_python_keep_their_order():
    """A control message or a non-TCP frame between segments: the open run in C is written
    first, then the frame, then the next run."""
    keys = (os.urandom(32), os.urandom(32))
    tx = Session(keys[0], keys[1], 11, 22, initiator=True)
    wire = wire_of(keys, [(0, os.urandom(5000), "A", 1000)])
    tx.counter = len(wire)
    udp = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                / IP(src="100.96.0.1", dst="100.96.0.2") / UDP(sport=53, dport=53) / b"abcd")
    wire_mid = [tx.seal(udp)]
    wire += wire_mid

    async def go():
        dp, tap = receiver(keys, True)
        try:
            for d in wire:
                dp.receive(d, len(d), ("198.18.0.9", 1), None, None)
            await asyncio.sleep(0)
            return tap.frames()
        finally:
            tap.close()

    out = asyncio.run(go())
    assert [len(f) for _, f in out] == [14 + 40 + 5000, len(udp)]
    assert out[0][0][1] == gso.GSO_TCPV4 and out[1][0] == gso.NO_VNET


def _mangle(seg: bytes, at: int, val: int) -> bytes:
    b = bytearray(seg)
    if b:
        b[at % len(b)] = val
    return bytes(b)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
           st.tuples(st.just("raw"), st.binary(max_size=300), st.sampled_from([SEG, SEG | FMT_CONT]),
                     st.sampled_from([0, 34, 54, 74, 65535])),
           st.tuples(st.just("mangled"), st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255),
                     st.sampled_from([SEG, SEG | FMT_CONT])),
           st.tuples(st.just("good"), st.integers(min_value=0, max_value=2))), min_size=1, max_size=30),
       st.booleans())
def test_hostile_plaintexts_from_an_authenticated_peer_are_handled_as_python_does(items, glue):
    """What a peer with the keys can send: any bytes, or real segments with one byte changed
    (lengths, offsets, flags, the IP version), under either TCP format, between real
    segments. The C loop must neither crash nor write anything the Python loop would not."""
    keys = (os.urandom(32), os.urandom(32))
    tx = Session(keys[0], keys[1], 11, 22, initiator=True)
    good = [gso.segment(with_partial(tso_frame(v6, _BYTES[:3000], [], "A", 5000, 1)), 1000)
            for v6 in (False, True)]
    wire, k = [], 0
    for it in items:
        if it[0] == "raw":
            wire.append(tx.seal(it[1], it[2], it[3]))
        elif it[0] == "mangled":
            seg = bytes(good[it[1] % 2][it[1] % 3])
            wire.append(tx.seal(_mangle(seg, it[1], it[2]), it[3], 34 if it[1] % 2 == 0 else 54))
        else:
            seg = bytes(good[0][k % 3])
            k += 1
            wire.append(tx.seal(seg, SEG | (FMT_CONT if k % 3 != 1 else 0), 34))
    got = []

    async def go():
        for c_loops in (True, False):
            dp, tap = receiver(keys, c_loops)
            try:
                for data, seg in bursts(wire, glue):
                    dp.receive(data, seg, ("198.18.0.9", 1), None, None)
                await asyncio.sleep(0)
                out = tap.frames()
                for vh, f in out:
                    gso.check_vnet(vh, f)
                got.append(([(v, bytes(f)) for v, f in out], dict(dp.stats.drops), dp.stats.rx_packets))
            finally:
                tap.close()

    asyncio.run(go())
    assert got[0] == got[1]
