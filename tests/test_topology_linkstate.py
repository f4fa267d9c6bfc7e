"""Link-state advertisements and their database (issue 16 item 3): merge rules, removal,
the graph handed to the switch app. Pure, no lab."""

from __future__ import annotations

import json
import random

import pytest

from ipop_switch.topology import LSA, LinkStateDB, LsaOriginator


def ids(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return sorted(f"{rng.getrandbits(128):032x}" for _ in range(n))


A, B, C, D = ids(4)


def test_newer_seq_replaces_older_and_equal_seq_are_ignored():
    db = LinkStateDB()
    assert db.update(LSA(A, 1000, 2, (B,)))
    assert not db.update(LSA(A, 1000, 1, (B, C)))   # older
    assert not db.update(LSA(A, 1000, 2, (C,)))     # same version
    assert db.get(A).neighbours == (B,)
    assert db.update(LSA(A, 1000, 3, (B, C)))
    assert db.get(A).neighbours == (B, C)


def test_a_restarted_node_wins_with_its_new_epoch_though_its_seq_restarted():
    db = LinkStateDB()
    db.update(LSA(A, 1000, 57, (B, C)))
    assert db.update(LSA(A, 2000, 1, (D,)))         # restarted: epoch = new start time
    assert db.get(A).version == (2000, 1)
    assert not db.update(LSA(A, 1000, 58, (B,)))    # a late LSA of the old life: ignored


def test_members_that_left_are_dropped():
    db = LinkStateDB()
    for x in (A, B, C):
        db.update(LSA(x, 1, 1, ()))
    assert db.remove(B) and not db.remove(B)
    assert db.retain([A, D]) == [C]
    assert db.origins() == {A}


def test_the_graph_has_the_edges_both_ends_claim_plus_my_own_links():
    db = LinkStateDB()
    db.update(LSA(A, 1, 1, (B, C)))
    db.update(LSA(B, 1, 1, (A,)))
    db.update(LSA(C, 1, 1, (D,)))      # C does not claim A: A-C is left out; D has no LSA: C-D too
    db.update(LSA(D, 1, 1, (A,)))      # D claims me (A's view is from D? no: I am D below)
    assert db.edges(C, my_up=[]) == {(A, B)}
    # as D: my own up links are authoritative; others' claims on me are not
    assert db.edges(D, my_up=[C]) == {(A, B), (C, D)}
    assert db.edges(D, my_up=[]) == {(A, B)}      # A and C claim D, but D has no such link


def test_the_originator_bumps_seq_only_on_change():
    o = LsaOriginator(A, epoch_ms=1234)
    first = o.update([B, C])
    assert first == LSA(A, 1234, 1, (B, C))
    assert o.update([C, B]) is None
    second = o.update([B])
    assert second.seq == 2 and second.neighbours == (B,)
    db = LinkStateDB()
    assert db.update(second) and not db.update(first)


def test_wire_form_round_trips_and_bad_lsas_are_refused():
    lsa = LSA(A, 1700000000000, 3, (B, C))
    raw = lsa.encode()
    assert LSA.from_dict(json.loads(raw)) == lsa
    assert len(raw) == len(json.dumps(lsa.to_dict(), separators=(",", ":")))
    for bad in ({}, {"origin": A, "epoch": 1, "seq": 1},
                {"origin": "nothex", "epoch": 1, "seq": 1, "neighbours": []},
                {"origin": A, "epoch": -1, "seq": 1, "neighbours": []},
                {"origin": A, "epoch": 1, "seq": True, "neighbours": []},
                {"origin": A, "epoch": 1, "seq": 1, "neighbours": [5]},
                {"origin": A, "epoch": 1, "seq": 1, "neighbours": "B"}):
        with pytest.raises(ValueError):
            LSA.from_dict(bad)
    # an origin listing itself: dropped from its neighbours
    assert LSA.from_dict({"origin": A, "epoch": 1, "seq": 1, "neighbours": [A, B, B]}).neighbours == (B,)


def test_random_graphs_are_rebuilt_exactly_from_everyones_lsas():
    rng = random.Random(7)
    nodes = ids(60, seed=7)
    for _ in range(20):
        edges = {tuple(sorted(rng.sample(nodes, 2))) for _ in range(150)}
        adj = {n: set() for n in nodes}
        for a, b in edges:
            adj[a].add(b)
            adj[b].add(a)
        db = LinkStateDB()
        for n in nodes:
            db.update(LsaOriginator(n, 1).update(adj[n]))
        me = rng.choice(nodes)
        assert db.edges(me, adj[me]) == edges
