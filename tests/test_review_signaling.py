"""Security review, finding 6 (low): replay-floor poisoning.

The replay cache had one floor for all senders and accepted timestamps up to 60 s ahead:
one member sending many valid messages dated near that edge made everyone's messages
"stale" for a minute, again and again. Now every sender has its own floor and quota, and
messages may be dated only a few seconds ahead.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

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
@given(st.lists(st.tuples(st.sampled_from([A, M, "b" * 32]), st.integers(0, 40), st.integers(-70_000, 10_000)),
                min_size=1, max_size=200))
def test_no_replay_is_ever_accepted_and_the_cache_stays_bounded(msgs):
    g = ReplayGuard(window=60, max_entries=16, per_sender=8)
    accepted = set()
    for sender, n, dt in msgs:
        ts = NOW + dt
        if g.check(sender, f"n{n}", ts, NOW) is None:
            assert (sender, n) not in accepted, "a replay was accepted"
            g.commit(sender, f"n{n}", ts, NOW)
            accepted.add((sender, n))
        assert len(g) <= 16
