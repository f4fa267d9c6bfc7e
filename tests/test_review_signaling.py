"""Security review, findings 4 (medium) and 6 (low) of signaling.

Finding 6: replay-floor poisoning.

The replay cache had one floor for all senders and accepted timestamps up to 60 s ahead:
one member sending many valid messages dated near that edge made everyone's messages
"stale" for a minute, again and again. Now every sender has its own floor and quota, and
messages may be dated only a few seconds ahead.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.signaling_direct import deliver, members
from ipop_switch.signaling.events import PeerMessage
from ipop_switch.signaling.protocol import MAX_BODY, Envelope, encode, parse
from ipop_switch.signaling.replay import ReplayGuard

A, M = "a" * 32, "f" * 32          # an honest member, a misbehaving one
NOW = 7_000_000_000


def test_a_flooding_member_cannot_make_others_stale():
    g = ReplayGuard(window=60, max_entries=8)
    for j in range(50):                      # far more than the cache holds, dated 4 s ahead
        ts = NOW + 4_000 + j
        assert g.check(M, f"m{j}", ts, NOW) is None
        g.commit(M, f"m{j}", ts, NOW)
    assert g.check(A, "a1", NOW - 1_000, NOW) is None      # the honest member's message is fresh
    g.commit(A, "a1", NOW - 1_000, NOW)
    assert g.check(A, "a1", NOW - 1_000, NOW) == "replayed"
    assert len(g) <= 8


def test_messages_dated_more_than_a_few_seconds_ahead_are_stale():
    g = ReplayGuard(window=60, max_future=5)
    assert g.check(M, "m", NOW + 59_000, NOW) == "stale"
    assert g.check(M, "m", NOW + 6_000, NOW) == "stale"
    assert g.check(M, "m", NOW + 4_000, NOW) is None


def test_a_sender_over_its_quota_pays_with_its_own_late_messages_only():
    g = ReplayGuard(window=60, max_entries=100, per_sender=4)
    for j in range(6):
        g.commit(M, f"m{j}", NOW - 10_000 + j, NOW)
    assert g.check(M, "late", NOW - 9_999, NOW) == "stale"     # below M's floor
    assert g.check(A, "late", NOW - 9_999, NOW) is None         # A has no floor


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from([A, M, "b" * 32]), st.integers(0, 40)), min_size=1, max_size=200),
       st.lists(st.integers(-70_000, 10_000), min_size=41, max_size=41))
def test_no_replay_is_ever_accepted_and_the_cache_stays_bounded(msgs, dts):
    """Messages arrive in any order, many times over; a message is (sender, nonce, timestamp),
    fixed as signed, so a replay carries the same timestamp. Whatever the cache pressure, each
    is accepted at most once and the cache never exceeds its bound."""
    g = ReplayGuard(window=60, max_entries=16, per_sender=8)
    accepted = set()
    for sender, n in msgs:
        ts = NOW + dts[n]
        if g.check(sender, f"n{n}", ts, NOW) is None:
            assert (sender, n) not in accepted, "a replay was accepted"
            g.commit(sender, f"n{n}", ts, NOW)
            accepted.add((sender, n))
        assert len(g) <= 16


# -- finding 4 (medium): the untrusted XMPP server saw ICE credentials ------------------------

SECRET = {"ufrag": "Xq7u", "pwd": "s3cr3t-ice-password-of-the-link", "candidates": ["198.18.7.7 4000 typ host"]}


@pytest.fixture
def pair(tmp_path):
    return members(tmp_path, ("a", "b", "c"))


def _deliver(s, text: str, sig: str) -> list:
    return deliver(s, text, sig)[1]


def test_link_bodies_reach_the_server_sealed_and_the_peer_in_the_clear(pair):
    a, b, _ = pair
    a._transmit(f"room/{b.node_id}", b.node_id, "link_offer", SECRET)
    (_, text, sig), = a._conn.sent
    on_the_server = base64.b64decode(text)
    for v in ("s3cr3t-ice-password", "Xq7u", "198.18.7.7"):
        assert v.encode() not in on_the_server, f"the server can read {v!r}"
    events = _deliver(b, text, sig)
    assert [e for e in events if isinstance(e, PeerMessage)] == [PeerMessage(a.node_id, "link_offer", SECRET)]


def test_a_body_sealed_for_another_member_or_altered_is_dropped(pair):
    a, b, c = pair
    a._transmit(f"room/{c.node_id}", c.node_id, "link_offer", SECRET)
    (_, text, _sig), = a._conn.sent
    env, _, _ = parse(text, _sig)
    # a (misbehaving) member re-addresses a's sealed body to b under its own signature: b cannot open it
    text2, sig2 = encode(Envelope("blue", c.node_id, b.node_id, "link_offer", env.body), c.identity.sign)
    assert _deliver(b, text2, sig2) == [] and b.drops.as_dict().get("bad_seal") == 1
    # an unsealed body from an old or careless sender is refused, not read
    text3, sig3 = encode(Envelope("blue", a.node_id, b.node_id, "link_offer", SECRET), a.identity.sign)
    assert _deliver(b, text3, sig3) == [] and b.drops.as_dict().get("bad_seal") == 2
    # bit flips in the sealed blob
    blob = bytearray(base64.b64decode(json.loads(base64.b64decode(text))["body"]["sealed"]))
    blob[-1] ^= 1
    text4, sig4 = encode(Envelope("blue", a.node_id, b.node_id, "link_offer",
                                  {"sealed": base64.b64encode(bytes(blob)).decode()}), a.identity.sign)
    assert _deliver(b, text4, sig4) == [] and b.drops.as_dict().get("bad_seal") == 3


def test_the_largest_payload_still_fits_sealed(pair):
    a, b, _ = pair
    big = {"blob": "x" * (MAX_BODY - 20)}
    a._transmit(f"room/{b.node_id}", b.node_id, "link_offer", big)
    (_, text, sig), = a._conn.sent
    assert [e.payload for e in _deliver(b, text, sig) if isinstance(e, PeerMessage)] == [big]
