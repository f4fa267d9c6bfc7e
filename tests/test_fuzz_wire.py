"""Property-based fuzzing (hypothesis) of every parser a peer or the XMPP server can feed:
the tunnel's receive path over whole UDP GRO bursts cut anywhere, in Python and in C;
the handshake layer from the raw datagram (tunnel/keys.py with
admission.py) down to the Noise messages (handshake.py); the signaling element parser
(protocol.parse), sealed bodies (seal.unseal) and a SignalingSession's receive path.

What test_datapath/test_fastpath/test_tunnel_* already throw at the datapath (hostile
plaintexts from an authenticated peer, bit flips of one packet, a forged piece of a
burst) is not repeated: here the bytes themselves are arbitrary, and the properties are
the ones an attacker without the keys must never break: no exception escapes, every
datagram is accounted for exactly once, nothing reaches the TAP or the application that
the genuine peer did not send, and a genuine handshake or message still goes through
afterwards. The C loops are also fuzzed under ASan/UBSan by ``ipop-switch bench --fuzz``
(tests/test_fuzz_bench.py).
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import os
import struct
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings, strategies as st

from ipop_switch.tunnel import accel, admission, codec, gso
from ipop_switch.tunnel import handshake as hs
from ipop_switch.tunnel.datapath import Datapath
from ipop_switch.tunnel.keys import Keys
from ipop_switch.tunnel.session import Session, SessionTable
from ipop_switch.tunnel.stats import Stats
from ipop_switch.tunnel.timers import Timers

from helpers import signaling_direct
from helpers.seq_tap import SeqTap

_fp = accel.fastpath or importlib.import_module("ipop_switch.tunnel._fastpath")
SEG = codec.FMT_SEG
# drops a datagram can take before it is authenticated: each is one datagram, nothing else
PRE_AUTH = ("malformed", "offload_refused", "unknown_index", "replay", "auth")


# -- the tunnel: GRO bursts of genuine and hostile datagrams, cut anywhere ------------------

def tcp_v4(seq: int, payload: bytes, ident: int) -> bytes:
    """An IPv4 TCP segment of one flow with its partial checksum, as a TSO TAP hands it over."""
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 5 << 4, 0x10, 502, 0, 0))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), ident, 0x4000, 64, 6, 0,
                     bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2]))
    struct.pack_into("!H", tcp, 16, gso.pseudo_partial(4, ip, 20 + len(payload)))
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + bytes(tcp) + payload


# One piece of a burst: what a genuine peer sends (a TCP segment of its flow, a whole
# frame, a control message) or what anyone can send (garbage, a genuine packet altered,
# truncated or replayed, our header in front of junk, a handshake type byte).
pieces = st.lists(st.one_of(
    st.tuples(st.just("seg"), st.one_of(st.just(1400), st.integers(1, 1400))),
    st.tuples(st.just("run"), st.integers(2, 12)),
    st.tuples(st.just("frame"), st.binary(min_size=14, max_size=300)),
    st.tuples(st.just("ctrl"), st.binary(max_size=13)),
    st.tuples(st.just("junk"), st.binary(min_size=1, max_size=200)),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000)),
    st.tuples(st.just("replay"), st.integers(0, 10_000)),
    st.tuples(st.just("ours"), st.sampled_from([0, SEG, codec.FMT_CONT_SEG, 0x01, 0x05, 0x80]),
              st.integers(0, 2**64 - 1), st.binary(max_size=200)),
    st.tuples(st.just("hs"), st.sampled_from([codec.TYPE_INIT, codec.TYPE_RESP, 0x00, 0x17]),
              st.binary(max_size=150)),
), min_size=1, max_size=24)


@pytest.fixture(params=["c", "python"])
def loops(request):
    """Each property runs with the datapath's C loops and with its Python ones (sessions
    and datapaths pick theirs when made)."""
    saved = accel.fastpath
    accel.fastpath = _fp if request.param == "c" else None
    yield request.param
    accel.fastpath = saved


def _burst(items, sa: Session, ridx: bytes):
    """The datagrams of ``items``; the genuine TCP payload stream and whole frames sent."""
    datagrams: list[bytes] = []
    stream, frames = bytearray(), []
    seq0, ident = 1_000_000, 0
    genuine: list[bytes] = []
    items = [x for it in items for x in ([("seg", 1400)] * it[1] if it[0] == "run" else [it])]
    for it in items:
        kind = it[0]
        if kind == "seg":
            payload = bytes((len(stream) + i) & 0xFF for i in range(it[1]))
            d = sa.seal(tcp_v4(seq0 + len(stream), payload, ident), SEG, 34)
            stream += payload
            ident += 1
        elif kind == "frame":
            d = sa.seal(it[1])
            frames.append(it[1])
        elif kind == "ctrl":
            d = sa.seal(it[1])
        elif kind == "junk":
            d = it[1]
        elif kind in ("flip", "cut", "replay"):
            if not genuine:
                continue
            g = genuine[it[1] % len(genuine)]
            if kind == "flip":
                b = bytearray(g)
                b[it[1] % len(b)] ^= it[2]
                d = bytes(b)
            elif kind == "cut":
                d = g[:it[1] % len(g)] or g[:1]
            else:
                d = g
        elif kind == "ours":
            _, fmt, counter, tail = it
            d = bytes((codec.TYPE_DATA, fmt, 0, 34)) + ridx + counter.to_bytes(8, "big") + tail
        else:
            d = bytes([it[1]]) + it[2]
        if kind in ("seg", "frame", "ctrl"):
            genuine.append(d)
        datagrams.append(d)
    return datagrams, bytes(stream), seq0, frames


def _gro(datagrams: list[bytes], seg: int) -> tuple[bytes, int]:
    """UDP GRO glues datagrams of one size with at most one shorter last: here every
    datagram is padded or cut to ``seg`` (but the last), which is what a receiver sees
    when the kernel's segment size and the sender's disagree, or an attacker's sizes."""
    out = bytearray()
    for i, d in enumerate(datagrams):
        out += d if i == len(datagrams) - 1 else (d + bytes(seg))[:seg]
    return bytes(out), -(-len(out) // seg)


def _feed(dp: Datapath, datagrams: list[bytes], seg: int | str | None) -> int:
    """The datagrams into ``dp`` one by one (``seg`` None) or as one GRO buffer cut every
    ``seg`` bytes ("first": the first datagram's size, as the kernel's GRO does), inside an
    event loop (the end-of-burst flush is scheduled on it). Returns how many datagrams."""
    if seg == "first":
        seg = len(datagrams[0]) if datagrams else 1

    async def run() -> int:
        if seg is None:
            for d in datagrams:
                dp.datagram(d, ("198.18.0.9", 1), None)
            n = len(datagrams)
        else:
            data, n = _gro(datagrams, seg)
            dp.receive(data, seg, ("198.18.0.9", 1), None, None)
        for _ in range(3):
            await asyncio.sleep(0)
        return n
    return asyncio.run(run())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces, st.one_of(st.none(), st.just("first"), st.integers(1, 1600)))
def test_any_gro_burst_delivers_only_what_the_peer_sent_and_counts_every_datagram(loops, items, seg):
    k1, k2 = os.urandom(32), os.urandom(32)
    tap = SeqTap()
    controls, handshakes = [], []
    dp = Datapath(tap.fd, Stats(), lambda s, p: controls.append(p),
                  lambda d, p, a: handshakes.append(d), tap=tap, bridge_tso=True)
    sa = Session(k1, k2, 11, 22, initiator=True)
    sb = Session(k2, k1, 22, 11, initiator=True)
    dp.table.current = dp.table.by_index[22] = sb
    assert (sb.tx_fast is not None) == (loops == "c")
    try:
        datagrams, stream, seq0, frames = _burst(items, sa, sa.ridx)
        n = _feed(dp, datagrams, seg)
        written = tap.frames()
        st_ = dp.stats
        # every datagram is taken, dropped before authentication, or handed on, once
        assert st_.rx_packets + sum(st_.drops[r] for r in PRE_AUTH) + len(handshakes) == n
        # nothing reaches the TAP that the peer did not send: whole frames as sent, in
        # order, at most once; TCP payload only as a slice of its stream at its sequence
        # number, each byte at most once
        seen_frames, ranges = [], []
        for vh, f in written:
            if vh == gso.NO_VNET:
                seen_frames.append(f)
                continue
            gso.check_vnet(vh, f)
            lay = gso.Layout(f)
            off = struct.unpack_from("!I", f, lay.tcp_off + 4)[0] - seq0
            body = f[lay.payload_off:]
            assert 0 <= off and stream[off:off + len(body)] == body, "TCP bytes the peer never sent"
            ranges.append((off, off + len(body)))
        ranges.sort()
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), "TCP bytes written twice"
        it = iter(frames)
        assert all(any(f == g for g in it) for f in seen_frames), "a frame not sent, out of order or twice"
        assert all(len(c) < codec.ETH_MIN for c in controls)
    finally:
        tap.close()


# -- the handshake layer: raw datagrams into keys.Keys ------------------------------------

def _keys(static, peer_pub, table=None) -> Keys:
    k = Keys(static, peer_pub, "link-1", Timers(), Stats(), table or SessionTable())
    k.set_prologue("ufragA", "ufragB")
    return k


hostile_hs = st.lists(st.tuples(
    st.sampled_from([codec.TYPE_INIT, codec.TYPE_RESP, codec.TYPE_DATA, 0]),
    st.one_of(st.binary(max_size=200),
              st.binary(min_size=codec.INIT_LEN - 4, max_size=codec.INIT_LEN - 4),
              st.binary(min_size=codec.RESP_LEN - 4, max_size=codec.RESP_LEN - 4)),
    st.booleans(),              # with a valid mac1 (what a sender who knows our public key can add)
    st.booleans()), min_size=1, max_size=8)


def _shape(type_: int, tail: bytes, with_mac: bool, mac_key: bytes) -> bytes:
    msg = bytes([type_]) + b"\0\0\0" + tail
    return admission.add_mac1(mac_key, msg) if with_mac else msg


@settings(max_examples=120, deadline=None)
@given(hostile_hs)
def test_hostile_handshake_datagrams_make_no_session_and_spoil_no_handshake(msgs):
    """Arbitrary handshake-looking datagrams to both ends (with or without a valid mac1):
    no exception, nothing answered, no session, each counted as one drop; then a genuine
    handshake between the same two objects still completes."""
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    ta, tb = SessionTable(), SessionTable()
    ini, res = _keys(a, hs.pub_bytes(b), ta), _keys(b, hs.pub_bytes(a), tb)
    ini.start()
    sent: list[bytes] = []
    ini.tick(sent.append)
    for i, (type_, tail, with_mac, to_initiator) in enumerate(msgs):
        addr = (f"198.18.1.{i}", 4000)
        if to_initiator:
            pkt = _shape(type_, tail, with_mac, admission.mac1_key(hs.pub_bytes(a)))
            before = sum(ini.stats.drops.values())
            assert ini.on_response(pkt, addr) is False
            assert sum(ini.stats.drops.values()) == before + 1
        else:
            pkt = _shape(type_, tail, with_mac, admission.mac1_key(hs.pub_bytes(b)))
            before = sum(res.stats.drops.values())
            assert res.on_initiation(pkt, addr) is None
            assert sum(res.stats.drops.values()) == before + 1
    assert ta.current is None and not ta.by_index and tb.next is None and not tb.by_index
    assert ini.stats.handshakes == res.stats.handshakes == 0
    # the genuine initiation sent before the noise still opens, and its response completes
    (init,) = sent
    resp = res.on_initiation(init, ("198.18.9.9", 5000))
    assert resp is not None and ini.on_response(resp, ("198.18.9.8", 5000)) is True
    assert ta.current is not None and tb.next is not None
    assert ta.current.local_index == tb.next.remote_index


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([codec.TYPE_INIT, codec.TYPE_RESP]))
def test_admission_lets_through_only_the_exact_shape_with_its_mac1(pkt, type_):
    key = admission.mac1_key(os.urandom(32))
    why = admission.refusal(key, pkt, type_)
    want = codec.INIT_WIRE_LEN if type_ == codec.TYPE_INIT else codec.RESP_WIRE_LEN
    assert why in (None, "handshake_malformed", "handshake_mac")
    assert why != None or (len(pkt) == want and pkt[0] == type_ and pkt[1:4] == b"\0\0\0"  # noqa: E711
                           and admission.mac1(key, pkt[:-16]) == pkt[-16:])
    good = admission.add_mac1(key, bytes([type_]) + b"\0\0\0" + pkt.ljust(want, b"\1")[:want - 20])
    assert admission.refusal(key, good, type_) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.floats(0, 3, allow_nan=False)), max_size=300))
def test_the_source_limiter_holds_every_source_to_its_rate_and_stays_bounded(events):
    lim = admission.SourceLimiter(rate=5.0, burst=5.0, max_sources=16)
    now, start, allowed = 0.0, 0.0, {}
    for src, dt in events:
        now += dt
        if lim.allow(f"198.18.2.{src}", now):
            allowed[src] = allowed.get(src, 0) + 1
        assert len(lim) <= 16
    for src, k in allowed.items():
        assert k <= 5 + 5.0 * (now - start) + 1e-9


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.binary(min_size=codec.INIT_LEN - 4, max_size=codec.INIT_LEN - 4).map(lambda t: b"\xe1\0\0\0" + t),
                 st.binary(min_size=codec.RESP_LEN - 4, max_size=codec.RESP_LEN - 4).map(lambda t: b"\xe2\0\0\0" + t)))
def test_noise_messages_of_any_bytes_raise_only_handshake_error(pkt):
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    with pytest.raises(hs.HandshakeError):
        hs.Responder(b, hs.pub_bytes(a), b"p").consume_initiation(pkt)
    i = hs.Initiator(a, hs.pub_bytes(b), b"p")
    i.initiation(1, 2)
    with pytest.raises(hs.HandshakeError):
        i.consume_response(pkt)


# -- signaling: the element parser, sealed bodies, the session's receive path -----------------

from ipop_switch.signaling import protocol                                     # noqa: E402
from ipop_switch.signaling.events import PeerMessage                           # noqa: E402
from ipop_switch.signaling.protocol import Drop, Envelope, encode, parse       # noqa: E402
from ipop_switch.signaling.seal import SealError, info_of, seal, unseal        # noqa: E402
from ipop_switch.signaling.session import SignalingSession                     # noqa: E402

b64 = st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**60, 2**60) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12)
FIELDS = ("v", "ov", "from", "to", "type", "ts", "nonce", "body")
plausible = {"v": st.just(1), "ov": st.just("blue"), "from": st.just("a" * 32), "to": st.just("b" * 32),
             "type": st.sampled_from(["link_offer", "announce", "X", ""]), "ts": st.integers(-1, 2**54),
             "nonce": st.sampled_from(["0" * 32, "zz"]),
             "body": st.dictionaries(st.text(max_size=6), json_values, max_size=3)}
# an envelope with each field either plausible or any JSON value (or missing)
envelopes = st.fixed_dictionaries(
    {}, optional={k: st.one_of(plausible[k], json_values) for k in FIELDS}).map(
    lambda d: base64.b64encode(json.dumps(d).encode()).decode())
texts = st.one_of(st.none(), st.text(max_size=300), b64, envelopes,
                  st.sampled_from(["bnVsbA==", "W10=", "e30=", "Tg==", base64.b64encode(b"[" * 5000).decode()]))
sigs = st.one_of(st.none(), st.text(max_size=200),
                 st.binary(min_size=64, max_size=64).map(lambda b: base64.b64encode(b).decode()))


@settings(max_examples=500, deadline=None)
@given(texts, sigs)
def test_the_element_parser_raises_only_drop_and_returns_only_well_formed_envelopes(text, sig):
    try:
        env, raw, signature = parse(text, sig)
    except Drop as d:
        assert d.reason in ("oversized", "unsigned", "malformed", "bad_version")
        return
    assert len(signature) == protocol.SIG_LEN and len(raw) <= protocol.MAX_ENVELOPE
    assert protocol.OVERLAY_RE.match(env.overlay) and protocol.TYPE_RE.match(env.type)
    assert protocol.NODE_ID_RE.match(env.sender) and protocol.NODE_ID_RE.match(env.recipient)
    assert protocol.NONCE_RE.match(env.nonce) and isinstance(env.body, dict) and 0 <= env.ts_ms < 2**53


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.dictionaries(st.just("sealed"), st.one_of(b64, st.text(max_size=100), json_values)),
                 st.binary(min_size=48, max_size=200).map(lambda b: {"sealed": base64.b64encode(b).decode()})))
def test_unseal_of_any_body_raises_only_seal_error(body):
    with pytest.raises(SealError):
        unseal(body, X25519PrivateKey.generate(), b"info")


def test_unseal_refuses_low_order_ephemeral_keys():
    """The all-zero and other small-order X25519 points give an all-zero secret."""
    small_order = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
    for epk in (bytes(32), b"\1" + bytes(31), small_order):
        with pytest.raises(SealError):
            unseal({"sealed": base64.b64encode(epk + bytes(40)).decode()}, X25519PrivateKey.generate(), b"i")


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two members of group "blue" who know each other (as after their announces)."""
    return signaling_direct.members(tmp_path_factory.mktemp("fuzz-sig"))


def _receive(s: SignalingSession, text, sig) -> tuple[str | None, list]:
    """What the session does with an element from the room: (drop reason or None, events)."""
    before = s.stats["received"]
    reason, events = signaling_direct.deliver(s, text, sig)
    assert (reason is None) == (s.stats["received"] == before + 1)
    return reason, events


FORGER = Ed25519PrivateKey.generate()
signed_by_a = st.tuples(
    st.sampled_from(["link_offer", "link_answer", "announce", "x"]),
    st.one_of(st.dictionaries(st.text(max_size=8), json_values, max_size=4),
              st.dictionaries(st.just("sealed"), b64)),
    st.one_of(st.none(), st.dictionaries(st.text(max_size=8), json_values, max_size=4), json_values),
    st.sampled_from(["blue", "red"]),
    st.integers(-120_000, 120_000),
    st.one_of(st.none(), st.integers(0, 400), st.binary(max_size=20)),
    st.booleans())              # signed by someone else's key (a forgery of a's messages)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.tuples(texts, sigs), signed_by_a), min_size=1, max_size=6))
def test_a_session_drops_anything_but_genuine_messages_and_emits_only_what_was_sealed(members, items):
    """Arbitrary elements, and messages really signed by member a (or forged in its name)
    with arbitrary type, body, sealed content, overlay and date, some altered after
    signing: the receive path
    raises nothing but Drop, and the application sees a message only when a sealed it,
    to b, with exactly that payload."""
    a, b = members
    for it in items:
        if len(it) == 2:
            reason, events = _receive(b, *it)
            assert reason is not None and not events
            continue
        mtype, body, sealed, overlay, dt, flip, forged = it
        if sealed is not None:
            body = seal(json.dumps(sealed).encode(), a._peers[b.node_id].peer.tunnel_public,
                        info_of(overlay, a.node_id, b.node_id, mtype))
        env = Envelope(overlay, a.node_id, b.node_id, mtype, body, int(time.time() * 1000) + dt)
        text, sig = encode(env, FORGER.sign if forged else a.identity.sign)
        if isinstance(flip, int):
            raw = bytearray(base64.b64decode(text))
            raw[flip % len(raw)] ^= 0x20
            text = base64.b64encode(bytes(raw)).decode()
        elif flip:
            text = text + base64.b64encode(flip).decode()
        reason, events = _receive(b, text, sig)
        genuine = (not forged and not flip and not isinstance(flip, int) and overlay == "blue"
                   and mtype != "announce" and isinstance(sealed, dict))
        if reason is None:
            assert genuine and -61_000 < dt < 6_000, f"accepted: {it}"
            assert events == [PeerMessage(a.node_id, mtype, sealed)]
        else:
            assert not [e for e in events if isinstance(e, PeerMessage)]
            assert not (genuine and -50_000 < dt < 4_000), f"a genuine message was dropped ({reason}): {it}"
