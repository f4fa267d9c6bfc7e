"""The signed message codec and the replay guard: unit and property tests (hypothesis)."""

from __future__ import annotations

import base64
import json
import secrets

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipop_switch.signaling.protocol import (MAX_BODY, MAX_WIRE, Drop, Envelope, check_outgoing, encode, parse,
                                            sign_input)
from ipop_switch.signaling.replay import ReplayGuard

KEY = ed25519.Ed25519PrivateKey.generate()
PUB = KEY.public_key()
A, B = "a" * 32, "b" * 32

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=10), kids, max_size=5),
    max_leaves=30)
bodies = st.dictionaries(st.text(max_size=12), json_values, max_size=6)
types = st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True)


def verified(text: str, sig: str) -> Envelope:
    env, raw, signature = parse(text, sig)
    PUB.verify(signature, sign_input(raw))  # raises InvalidSignature
    return env


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, typ=types)
def test_roundtrip_any_json_body(body, typ):
    env = Envelope("blue", A, B, typ, body)
    text, sig = encode(env, KEY.sign)
    got = verified(text, sig)
    assert got == env
    assert len(text) <= MAX_WIRE


@settings(max_examples=300)
@given(body=bodies, pos=st.integers(min_value=0), bit=st.integers(0, 7), which=st.sampled_from(["text", "sig"]))
def test_any_bit_flip_is_rejected(body, pos, bit, which):
    text, sig = encode(Envelope("blue", A, B, "link_offer", body), KEY.sign)
    raw = bytearray(base64.b64decode(text if which == "text" else sig))
    raw[pos % len(raw)] ^= 1 << bit
    mutated = base64.b64encode(bytes(raw)).decode()
    t, s = (mutated, sig) if which == "text" else (text, mutated)
    from cryptography.exceptions import InvalidSignature
    with pytest.raises((Drop, InvalidSignature)):
        verified(t, s)


@settings(max_examples=300)
@given(text=st.one_of(st.none(), st.text(max_size=200), st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode())),
       sig=st.one_of(st.none(), st.text(max_size=100), st.binary(min_size=64, max_size=64).map(lambda b: base64.b64encode(b).decode())))
def test_garbage_only_ever_raises_drop(text, sig):
    with pytest.raises(Drop):
        parse(text, sig)


@settings(max_examples=200)
@given(obj=st.dictionaries(st.sampled_from(["v", "ov", "from", "to", "type", "ts", "nonce", "body", "x"]),
                           json_values, max_size=9))
def test_any_json_object_is_parsed_or_dropped_never_crashes(obj):
    raw = json.dumps(obj).encode()
    try:
        env, _, _ = parse(base64.b64encode(raw).decode(), base64.b64encode(b"\0" * 64).decode())
    except Drop as d:
        assert d.reason in {"malformed", "bad_version", "oversized"}
    else:
        assert env.overlay == obj["ov"] and env.body == obj["body"]


def test_drop_reasons():
    ok_text, ok_sig = encode(Envelope("blue", A, B, "x", {}), KEY.sign)
    cases = {
        "unsigned": (ok_text, None),
        "oversized": ("A" * (MAX_WIRE + 1), ok_sig),
        "malformed": ("%%%", ok_sig),
    }
    for reason, (t, s) in cases.items():
        with pytest.raises(Drop) as e:
            parse(t, s)
        assert e.value.reason == reason
    nan = base64.b64encode(b'{"v":1,"ov":"blue","from":"' + A.encode() + b'","to":"' + B.encode() +
                           b'","type":"x","ts":1,"nonce":"' + b"0" * 32 + b'","body":{"n":NaN}}').decode()
    with pytest.raises(Drop) as e:
        parse(nan, ok_sig)
    assert e.value.reason == "malformed"
    v2 = dict(v=2, ov="blue")
    with pytest.raises(Drop) as e:
        parse(base64.b64encode(json.dumps(v2).encode()).decode(), ok_sig)
    assert e.value.reason == "bad_version"


def test_check_outgoing_limits():
    check_outgoing("link_offer", {"candidates": ["x" * 100] * 10})
    with pytest.raises(ValueError, match="exceeds"):
        check_outgoing("link_offer", {"blob": "x" * (MAX_BODY + 1)})
    with pytest.raises(ValueError, match="type"):
        check_outgoing("Bad-Type", {})
    with pytest.raises(ValueError, match="plain JSON"):
        check_outgoing("t", {"x": float("nan")})
    with pytest.raises(ValueError):
        check_outgoing("t", ["not", "a", "dict"])
    # the largest allowed body plus an announce-sized certificate still fits the wire limit
    body = {"blob": "x" * (MAX_BODY - 20)}
    text, _ = encode(Envelope("blue", A, B, "t", body), KEY.sign)
    parse(text, base64.b64encode(b"\0" * 64).decode())


def test_replay_guard_window_and_nonces():
    g = ReplayGuard(window=60)
    now = 1_000_000_000
    assert g.check(A, "n1", now, now) is None
    g.commit(A, "n1", now, now)
    assert g.check(A, "n1", now, now + 1000) == "replayed"
    assert g.check(B, "n1", now, now) is None             # nonces are per sender
    assert g.check(A, "n2", now - 61_000, now) == "stale"
    assert g.check(A, "n2", now + 61_000, now) == "stale"  # from the future too
    # entries leave once outside the window: the cache does not grow forever
    g.commit(A, "n3", now + 120_000, now + 120_000)
    assert len(g) == 1


def test_replay_guard_rejects_a_replay_of_an_evicted_message():
    """Deterministic: once the cache is full, the oldest entries are evicted; a replay of one of
    them (still inside the time window, nonce no longer cached) must be refused by the floor."""
    g = ReplayGuard(window=60, max_entries=4)
    now = 5_000_000
    msgs = [(A, f"{j:032x}", now - 10_000 + j) for j in range(6)]
    for sender, nonce, ts in msgs:
        assert g.check(sender, nonce, ts, now) is None
        g.commit(sender, nonce, ts, now)
    assert len(g) == 4  # msgs[0] and msgs[1] were evicted
    for sender, nonce, ts in msgs:
        assert g.check(sender, nonce, ts, now) is not None, f"replay of {nonce} accepted"
    assert g.check(*msgs[0], now) == "stale"  # evicted: refused by the floor, not by the cache
    assert g.check(*msgs[1], now) == "stale"
    assert g.check(*msgs[5], now) == "replayed"


@given(st.lists(st.integers(0, 59), min_size=1, max_size=300))
def test_replay_guard_is_bounded_and_never_accepts_a_replay(order):
    """Messages (fixed sender, nonce, timestamp each) arrive in any order, many times over: whatever
    the cache pressure, each is accepted at most once and the cache never exceeds its bound."""
    g = ReplayGuard(window=60, max_entries=16)
    now = 5_000_000
    msgs = [(str(j % 6), f"{j:032x}", now - 30_000 + j * 500) for j in range(60)]
    accepted: list[int] = []
    for j in order:
        sender, nonce, ts = msgs[j]
        if g.check(sender, nonce, ts, now) is None:
            g.commit(sender, nonce, ts, now)
            accepted.append(j)
        assert len(g) <= 16
    assert len(accepted) == len(set(accepted))


def test_nonces_and_timestamps_are_fresh_per_message():
    e1, e2 = Envelope("blue", A, B, "x", {}), Envelope("blue", A, B, "x", {})
    assert e1.nonce != e2.nonce and len(e1.nonce) == 32
    assert secrets.compare_digest(encode(e1, KEY.sign)[0], encode(e1, KEY.sign)[0])  # deterministic for one envelope
