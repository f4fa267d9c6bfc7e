"""The topology policy (issue 16 item 2): pure unit and property tests, no lab."""

from __future__ import annotations

import math
import random

import pytest

from ipop_switch.topology import OnDemand, TopologyParams, TopologyPolicy
from ipop_switch.topology.ring import RING_SIZE, Ring, distance, position
from ipop_switch.topology.symphony import draw_targets, harmonic_fraction


def ids(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(128):032x}" for _ in range(n)]


def up_all(pol: TopologyPolicy, d, now: float) -> None:
    """Every request of a decision accepted and up (the peer's side not modelled)."""
    for q, _ in d.open:
        pol.link_up(q, now)


# -- parameters ----------------------------------------------------------------------
@pytest.mark.parametrize("kw, word", [
    ({"all_to_all_max": 0}, "all_to_all_max"),
    ({"successors": 0}, "successors"),
    ({"long_links": -1}, "long_links"),
    ({"max_degree": 4}, "max_degree"),                    # not > 2 * successors
    ({"max_degree": 8}, "ondemand_slots"),                # not > 2 * successors + ondemand_slots
    ({"ondemand_slots": -1}, "ondemand_slots"),
    ({"all_to_all_max": 30, "max_degree": 24}, "max_degree"),
    ({"ondemand_threshold_bps": -1}, "ondemand_threshold_bps"),
    ({"ondemand_window": 0}, "ondemand_window"),
    ({"max_new_links_per_min": 0}, "max_new_links_per_min"),
    ({"min_link_age": -1}, "min_link_age"),
])
def test_params_are_validated_with_a_clear_error(kw, word):
    with pytest.raises(ValueError, match=word):
        TopologyParams(**kw)


def test_long_links_about_log2_n_per_node_half_opened():
    p = TopologyParams()
    assert p.long_total(1000) == 9 and p.long_opened(1000) == 4
    assert p.long_total(9) == 3 and p.long_opened(9) == 1
    assert TopologyParams(long_links=6).long_opened(10**6) == 3
    assert TopologyParams(long_links=0).long_opened(1000) == 0
    with pytest.raises(ValueError, match="32 hex"):
        TopologyPolicy("xyz")


# -- the ring --------------------------------------------------------------------------
def test_ring_successors_and_predecessors_match_a_sort():
    members = ids(50)
    ring = Ring(members)
    order = sorted(members, key=position)
    for i, m in enumerate(order):
        assert ring.successors(m, 3) == [order[(i + k) % 50] for k in (1, 2, 3)]
        assert ring.predecessors(m, 2) == [order[(i - k) % 50] for k in (1, 2)]
    outsider = ids(1, seed=99)[0]
    assert ring.successors(outsider, 1)[0] == ring.successor_of_point(position(outsider))
    assert Ring(members[:2]).successors(members[0], 5) == [members[1]]


@pytest.mark.parametrize("seed", range(5))
def test_successor_links_alone_form_one_connected_ring(seed):
    rng = random.Random(seed)
    members = ids(rng.randrange(9, 300), seed)
    ring = Ring(members)
    nxt = {m: ring.successors(m, 1)[0] for m in members}
    seen, x = set(), members[0]
    while x not in seen:  # one cycle through everyone
        seen.add(x)
        x = nxt[x]
    assert seen == set(members) and x == members[0]
    # with 2 successors, removing any one node leaves the rest connected (the ring heals)
    gone = rng.choice(members)
    adj = {m: set() for m in members if m != gone}
    for m in adj:
        for s in ring.successors(m, 2):
            if s != gone:
                adj[m].add(s)
                adj[s].add(m)
    stack, reach = [next(iter(adj))], set()
    while stack:
        u = stack.pop()
        if u not in reach:
            reach.add(u)
            stack += adj[u]
    assert reach == set(adj)


# -- harmonic distances ------------------------------------------------------------------
def test_harmonic_fraction_is_the_symphony_distribution():
    rng = random.Random(3)
    n = 4096
    xs = [harmonic_fraction(n, rng.random()) for _ in range(20000)]
    assert min(xs) >= 1 / n and max(xs) < 1
    # P(x < n^-1/2) = 1/2 and P(x < n^-3/4) = 1/4 for p(x) = 1/(x ln n)
    assert abs(sum(x < n ** -0.5 for x in xs) / len(xs) - 0.5) < 0.02
    assert abs(sum(x < n ** -0.75 for x in xs) / len(xs) - 0.25) < 0.02
    assert harmonic_fraction(n, 0.0) == pytest.approx(1 / n)


def test_long_link_targets_follow_the_harmonic_distances():
    rng = random.Random(5)
    members = ids(4096, seed=5)
    ring = Ring(members)
    n = len(ring)
    near = total = 0
    for i in range(3000):
        me = members[i]
        succ = ring.successors(me, 2)
        targets = draw_targets(me, ring, 1, rng, exclude=succ)
        assert me not in targets and not set(targets) & set(succ)
        for q in targets:
            total += 1
            near += distance(me, q) < RING_SIZE * n ** -0.5
    assert total > 2900
    # about half within n^-1/2 of the ring (a little less: a target is the successor
    # of the drawn point, and the 2 successors are skipped)
    assert 0.40 < near / total < 0.55


def test_draws_are_bounded_when_nothing_is_left():
    members = ids(5)
    ring = Ring(members)
    out = draw_targets(members[0], ring, 3, random.Random(1), exclude=members[1:])
    assert out == []


def test_two_choices_even_out_the_long_links_per_node():
    members = ids(2000, seed=15)
    ring = Ring(members)

    def in_degrees(two_choices: bool) -> list[int]:
        rng = random.Random(1)
        indeg = dict.fromkeys(members, 0)
        for me in members:
            for q in draw_targets(me, ring, 4, rng, exclude=ring.successors(me, 2),
                                  load=indeg.__getitem__ if two_choices else None):
                indeg[q] += 1
        return sorted(indeg.values())

    plain, even = in_degrees(False), in_degrees(True)
    assert sum(plain) == sum(even) == 8000
    assert even[-1] <= 0.7 * plain[-1] and even[-20] <= 0.7 * plain[-20]   # the top 1 % far lower
    assert even[-200] < plain[-200]


# -- all-to-all --------------------------------------------------------------------------
def test_all_to_all_at_or_below_the_limit_structured_above():
    members = ids(9)
    pol = TopologyPolicy(members[0], TopologyParams(all_to_all_max=8))
    d = pol.decide(0.0, members[:8])
    assert {q for q, _ in d.open} == set(members[1:8])
    assert set(d.roles.values()) == {"all-to-all"}
    pol9 = TopologyPolicy(members[0], TopologyParams(all_to_all_max=8))
    d9 = pol9.decide(0.0, members)
    roles = [r for _, r in d9.open]
    assert roles.count("successor") == 2 and roles.count("long") == 1 and len(roles) == 3


def test_growing_past_the_limit_drops_all_to_all_links_after_the_new_ones_are_up():
    members = ids(40, seed=2)
    p = TopologyParams(all_to_all_max=8, max_new_links_per_min=100)
    me = members[0]
    pol = TopologyPolicy(me, p)
    up_all(pol, pol.decide(0.0, members[:8]), 0.0)
    assert len(pol.up_links()) == 7
    d = pol.decide(10.0, members)  # now 40 members: ring + long links wanted
    wanted = {q for q, _ in d.open} | {q for q, r in d.roles.items() if r != "all-to-all"}
    assert not d.release and not d.close and d.held  # make-before-break
    up_all(pol, d, 10.0)
    d2 = pol.decide(20.0, members)
    assert set(d2.close) == set(members[1:8]) - wanted
    assert set(pol.roles()) == wanted


# -- degree cap and refusals -----------------------------------------------------------
def test_incoming_requests_refused_at_the_degree_cap_ring_links_keep_a_reserve():
    members = ids(60, seed=3)
    p = TopologyParams(max_degree=12, successors=2, ondemand_slots=3)
    pol = TopologyPolicy(members[0], p)
    others = iter(members[1:])
    accepted = sum(pol.accept_incoming(next(others), "long", 0.0) for _ in range(20))
    assert accepted == 5 and pol.refusals == 15           # 12 - 2 * 2 for the ring - 3 for on-demand
    assert [pol.accept_incoming(next(others), "on-demand", 0.0) for _ in range(4)] == [True, True, True, False]
    assert pol.accept_incoming(next(others), "long", 0.0) is False
    for _ in range(4):
        assert pol.accept_incoming(next(others), "successor", 0.0) is True
    assert pol.degree == 12
    assert pol.accept_incoming(next(others), "successor", 0.0) is False  # never above max_degree
    assert pol.degree == 12
    known = next(iter(pol.roles()))
    assert pol.accept_incoming(known, "long", 0.0) is True             # an existing link: no new degree
    assert pol.degree == 12
    # with on-demand off, long links may use those slots
    off = TopologyPolicy(members[0], TopologyParams(max_degree=12, ondemand_threshold_bps=0, ondemand_slots=3))
    assert sum(off.accept_incoming(m, "long", 0.0) for m in members[1:30]) == 8


@pytest.mark.parametrize("seed", range(3))
def test_degree_never_exceeds_the_cap_under_many_requests(seed):
    rng = random.Random(seed)
    members = ids(300, seed)
    p = TopologyParams(max_degree=12, max_new_links_per_min=1000)
    pols = {m: TopologyPolicy(m, p) for m in members}
    ring = Ring(members)
    for r in range(5):
        for a in rng.sample(members, len(members)):
            d = pols[a].decide(10.0 * r, ring)
            for q, role in d.open:
                if pols[q].accept_incoming(a, role, 10.0 * r):
                    pols[a].link_up(q, 10.0 * r)
                    pols[q].link_up(a, 10.0 * r)
                else:
                    pols[a].refused(q, 10.0 * r)
    assert max(pol.degree for pol in pols.values()) <= 12
    assert sum(pol.refusals for pol in pols.values()) > 0  # the cap was reached somewhere


def test_a_refused_long_link_is_redrawn_elsewhere():
    members = ids(200, seed=4)
    p = TopologyParams(long_links=2)  # one long link opened
    pol = TopologyPolicy(members[0], p)
    d = pol.decide(0.0, members)
    longs = [q for q, r in d.open if r == "long"]
    assert len(longs) == 1
    pol.refused(longs[0], 0.0)
    d2 = pol.decide(0.0, members)  # the caller decides again at once
    again = [q for q, r in d2.open if r == "long"]
    assert len(again) == 1 and again[0] != longs[0]
    # and the refusing peer is not asked again while backed off
    for t in (10.0, 20.0, 30.0):
        pol.link_down(again[0], t)
        d3 = pol.decide(t, members)
        assert longs[0] not in {q for q, _ in d3.open}


# -- stability, traffic, make-before-break -----------------------------------------------
def test_long_links_stay_when_members_come_and_are_redrawn_when_their_target_leaves():
    members = ids(300, seed=6)
    p = TopologyParams(max_new_links_per_min=100)
    me = members[0]
    pol = TopologyPolicy(me, p)
    up_all(pol, pol.decide(0.0, members[:200]), 0.0)
    longs = {q for q, r in pol.roles().items() if r == "long"}
    assert len(longs) == p.long_opened(200)
    d = pol.decide(10.0, members)  # 100 newcomers
    assert {q for q, r in pol.roles().items() if r == "long"} >= longs - set(Ring(members).successors(me, 2))
    assert not d.close
    up_all(pol, d, 10.0)
    gone = sorted(longs)[0]
    pol.link_down(gone, 20.0)
    rest = [m for m in members if m != gone]
    d2 = pol.decide(20.0, rest)
    assert [r for _, r in d2.open] == ["long"] and d2.open[0][0] != gone


def test_successor_replaced_make_before_break():
    members = sorted(ids(30, seed=7), key=position)
    me, s1, s2 = members[0], members[1], members[2]
    p = TopologyParams(long_links=0)
    pol = TopologyPolicy(me, p)
    ring_without = [m for m in members if m != s1]
    d = pol.decide(0.0, ring_without)
    assert {q for q, _ in d.open} == {s2, members[3]}
    up_all(pol, d, 0.0)
    # s1 joins between me and s2: members[3] is no longer a successor
    d = pol.decide(1000.0, members)
    assert d.open == ((s1, "successor"),) and members[3] in d.held and not d.close
    d = pol.decide(1010.0, members)   # s1 not up yet: still held
    assert members[3] in d.held and not d.close
    pol.link_up(s1, 1015.0)
    d = pol.decide(1020.0, members)
    assert d.close == (members[3],) and set(pol.roles()) == {s1, s2}


def test_a_link_carrying_traffic_is_not_torn_down_unless_replaced():
    members = ids(100, seed=8)
    p = TopologyParams(long_links=4, max_new_links_per_min=100, ondemand_threshold_bps=0)
    me = members[0]
    pol = TopologyPolicy(me, p)
    up_all(pol, pol.decide(0.0, members), 0.0)
    longs = sorted(q for q, r in pol.roles().items() if r == "long")
    assert len(longs) == 2
    # the target drops to one long link opened: one is surplus, and both carry traffic
    pol.params = TopologyParams(long_links=2, max_new_links_per_min=100, ondemand_threshold_bps=0)
    succ = Ring(members).successors(me, 2)[0]
    pol.link_down(succ, 95.0)      # a successor's replacement pending: nothing "replaced" yet
    for t in range(0, 120, 5):
        for q in longs:
            pol.traffic(q, 1000, float(t))
        if t == 100:
            d = pol.decide(100.0, members)  # busy (and 100 s old): held
            assert (succ, "successor") in d.open and d.held == (longs[1],) and not d.close and not d.release
        if t == 110:
            d = pol.decide(110.0, members)
            assert d.held == (longs[1],) and not d.close
    pol.link_up(succ, 112.0)
    d = pol.decide(120.0, members)  # everything wanted is up: replaced, released though busy
    assert d.close == (longs[1],) and pol.roles()[longs[0]] == "long"


def test_an_idle_surplus_link_waits_for_min_link_age_when_not_replaced():
    members = ids(100, seed=9)
    p = TopologyParams(long_links=4, max_new_links_per_min=100, ondemand_threshold_bps=0, min_link_age=30)
    me = members[0]
    pol = TopologyPolicy(me, p)
    up_all(pol, pol.decide(0.0, members), 0.0)
    longs = sorted(q for q, r in pol.roles().items() if r == "long")
    succ = Ring(members).successors(me, 2)
    pol.link_down(succ[0], 5.0)  # a successor went down: its replacement will be pending
    pol.params = TopologyParams(long_links=2, max_new_links_per_min=100, ondemand_threshold_bps=0, min_link_age=30)
    for t in range(0, 40, 5):
        pol.traffic(longs[1], 1000, float(t))  # the busy one is kept, the idle one is the surplus
    d = pol.decide(10.0, members)  # surplus idle but 10 s old, the successor's replacement pending: held
    assert (succ[0], "successor") in d.open and d.held == (longs[0],) and not d.close
    d = pol.decide(25.0, members)  # not replaced and only 25 s old: held
    assert d.held == (longs[0],) and not d.close
    d = pol.decide(35.0, members)  # idle and 35 s old: released although not replaced
    assert d.close == (longs[0],) and pol.roles()[longs[1]] == "long"
    d = pol.decide(45.0, members)  # the successor request never came up (request_timeout): given up
    assert d.close == (succ[0],)


# -- rate limit ---------------------------------------------------------------------------
def test_links_created_per_minute_are_limited():
    members = ids(8, seed=10)
    p = TopologyParams(max_new_links_per_min=3)
    pol = TopologyPolicy(members[0], p)
    d = pol.decide(0.0, members)
    assert len(d.open) == 3
    up_all(pol, d, 0.0)
    assert pol.decide(30.0, members).open == ()
    d = pol.decide(60.0, members)
    assert len(d.open) == 3
    up_all(pol, d, 60.0)
    assert len(pol.decide(120.0, members).open) == 1
    assert len(pol.up_links()) == 6


# -- on-demand ----------------------------------------------------------------------------
def test_ondemand_rate_over_a_sliding_window():
    od = OnDemand(window=10.0)
    for t in range(10):
        od.observe("p" * 32, 125_000, float(t))   # 1 Mbit/s
    assert od.rate("p" * 32, 9.5) == pytest.approx(1e6)
    assert od.rate("p" * 32, 14.5) == pytest.approx(0.5e6)
    assert od.rate("p" * 32, 30.0) == 0.0 and od.rates(30.0) == {}
    with pytest.raises(ValueError):
        OnDemand(window=0)


def test_ondemand_link_created_above_threshold_removed_after_idle_with_hysteresis():
    members = ids(50, seed=11)
    p = TopologyParams(ondemand_threshold_bps=1e6, ondemand_window=10, ondemand_idle=60, long_links=0)
    me = members[0]
    pol = TopologyPolicy(me, p)
    up_all(pol, pol.decide(0.0, members), 0.0)
    peer = next(m for m in members[1:] if m not in pol.roles())

    def feed(t0: float, t1: float, bps: float) -> None:
        t = t0
        while t < t1:
            pol.traffic(peer, int(bps / 8), t)
            t += 1.0

    feed(1.0, 11.0, 0.8e6)           # below the threshold: nothing
    assert pol.decide(11.0, members).open == ()
    feed(11.0, 21.0, 2e6)            # above: an on-demand link
    d = pol.decide(21.0, members)
    assert d.open == ((peer, "on-demand"),)
    pol.link_up(peer, 21.5)
    feed(21.0, 200.0, 0.5e6)         # below the threshold, above threshold/4: kept (hysteresis)
    d = pol.decide(200.0, members)
    assert pol.roles()[peer] == "on-demand" and not d.close
    feed(200.0, 400.0, 0.1e6)        # below threshold/4 from now on
    t_closed = None
    for t in range(210, 400, 10):
        if peer in pol.decide(float(t), members).close:
            t_closed = t
            break
    # the rate falls below 250 kbit/s about a window after 200 s, then 60 s of idle
    assert t_closed is not None and 200 + 60 <= t_closed <= 200 + 60 + 10 + 10


def test_ondemand_off_with_threshold_zero():
    members = ids(50, seed=12)
    pol = TopologyPolicy(members[0], TopologyParams(ondemand_threshold_bps=0))
    up_all(pol, pol.decide(0.0, members), 0.0)
    peer = next(m for m in members[1:] if m not in pol.roles())
    for t in range(10):
        pol.traffic(peer, 10**7, float(t))
    assert pol.decide(10.0, members).open == ()


# -- both ends -----------------------------------------------------------------------------
def test_a_link_lives_while_either_end_wants_it():
    a, b, c = ids(3, seed=13)
    pa, pb = TopologyPolicy(a), TopologyPolicy(b)
    # a asks b for a successor link; b accepts and sees it as its predecessor link
    d = pa.decide(0.0, [a, b])           # two members: all-to-all
    assert d.open == ((b, "all-to-all"),)
    assert pb.accept_incoming(a, "successor", 0.0)
    pa.link_up(b, 1.0)
    pb.link_up(a, 1.0)
    assert pb.roles()[a] == "predecessor" and pa.roles()[b] == "all-to-all"
    # b releases (it never wanted it for itself): a still wants it, so it stays
    assert pa.released(b, 2.0) is False and pa.roles()[b] == "all-to-all"
    # a releases: b does not want it either: close now
    assert pb.released(a, 3.0) is True and a not in pb.roles()
    assert pb.released(c, 3.0) is False  # unknown peer: nothing to close


def test_at_the_degree_cap_a_new_successor_breaks_before_make():
    members = sorted(ids(40, seed=14), key=position)
    me = members[0]
    p = TopologyParams(max_degree=8, successors=2, long_links=0, ondemand_slots=0)
    pol = TopologyPolicy(me, p)
    without = [m for m in members if m != members[1]]
    d = pol.decide(0.0, without)
    up_all(pol, d, 0.0)
    old = {q for q, _ in d.open}                      # members[2], members[3]
    others = [m for m in members[10:]]
    for q in others[:2]:                              # 2 incoming long links: the non-ring cap (8 - 4)
        assert pol.accept_incoming(q, "long", 1.0)
    assert not pol.accept_incoming(others[2], "long", 1.0)
    for q in [*without[-2:], *others[3:5]]:           # predecessors' successor links (2 in flux)
        assert pol.accept_incoming(q, "successor", 1.0)
    for q in pol.roles():
        pol.link_up(q, 1.0)
    assert pol.degree == 8
    d = pol.decide(100.0, members)                    # members[1] arrives: a new first successor
    assert not d.open and d.close == (members[3],)    # no room to make first: the old one goes now
    d = pol.decide(110.0, members)
    assert d.open == ((members[1], "successor"),) and pol.degree == 8
    assert old - {members[3]} <= set(pol.roles())


def test_the_policy_modules_are_pure():
    """No asyncio, no I/O, nothing of the agent's parts: the same code runs in the simulator."""
    import ast
    import sys
    from pathlib import Path
    pkg = Path(__file__).resolve().parent.parent / "ipop_switch" / "topology"
    for name in ("ring", "symphony", "ondemand", "policy", "linkstate"):
        tree = ast.parse((pkg / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [] if node.level else [node.module or ""]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                assert top in sys.stdlib_module_names and top not in {"asyncio", "socket", "subprocess", "os"}, (name, m)
