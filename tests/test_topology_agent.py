"""The agent's topology glue (agent/topology.py) on many nodes in one event loop: the
negotiation protocol (request, accept, refuse, release, drop), LSAs and the graph each
node would hand its switch app. Signaling is a queue per node (in order, as XMPP delivers
one sender's messages); a link is up once both ends opened it. The real agents, OVS and
links run the same code in tests/test_topology_lab.py."""

from __future__ import annotations

import asyncio

import pytest

from ipop_switch.agent.topology import DROP, LSA_TYPE, REQUEST
from ipop_switch.topology import TopologyParams
from tests.helpers.topology_net import Net, node_id


def nid(i: int) -> str:
    return node_id("node", i)


def connected(nodes: set[str], edges: set[tuple[str, str]]) -> bool:
    adj: dict[str, set[str]] = {n: set() for n in nodes}
    for a, b in edges:
        adj[a].add(b)
        adj[b].add(a)
    start = next(iter(nodes))
    seen, todo = {start}, [start]
    while todo:
        for v in adj[todo.pop()]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return seen == nodes


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_small_group_is_all_to_all_and_every_node_has_the_whole_graph():
    async def go():
        net = Net(5, TopologyParams(all_to_all_max=8, cycle=60))
        for t in net.nodes.values():
            for m in net.ids:
                if m != t.me:
                    t.member_appeared(m)
        await net.pump(3)
        edges = net.up_edges()
        assert len(edges) == 10, edges
        for me in net.ids:
            assert set(map(tuple, net.graphs[me])) == edges, me
            snap = net.nodes[me].snapshot()
            assert snap["mode"] == "all-to-all" and snap["degree"] == 4 and snap["reachable"] == 4, snap
        await net.stop()
    run(go())


def test_structured_group_is_connected_within_degree_and_graphs_agree():
    async def go():
        p = TopologyParams(all_to_all_max=4, max_degree=9, ondemand_slots=2, cycle=60)
        net = Net(24, p)
        await net.pump(6)
        edges = net.up_edges()
        assert connected(set(net.ids), edges)
        degree = {i: sum(i in e for e in edges) for i in net.ids}
        assert max(degree.values()) <= p.max_degree, degree
        assert len(edges) < 24 * 23 / 2 / 3, len(edges)       # far from all-to-all (276)
        for me in net.ids:
            assert set(map(tuple, net.graphs[me])) == edges, me
            snap = net.nodes[me].snapshot()
            assert snap["mode"] == "structured" and snap["unreachable"] == [] and snap["max_hops"] >= 2, snap
            assert set(net.nodes[me].policy.roles().values()) <= {"successor", "predecessor", "long"}, me
        await net.stop()
    run(go())


def test_a_node_leaving_is_repaired_and_forgotten():
    async def go():
        p = TopologyParams(all_to_all_max=4, max_degree=9, ondemand_slots=2, cycle=60, min_link_age=0)
        net = Net(16, p)
        await net.pump(6)
        gone = net.ids[3]
        net.leave(gone)
        await net.pump(6)
        edges = net.up_edges()
        assert all(gone not in e for e in edges)
        assert connected(net.present, edges)
        for me in net.present:
            assert set(map(tuple, net.graphs[me])) == edges, me
            assert gone not in net.nodes[me].db
        await net.stop()
    run(go())


def test_requests_beyond_the_degree_cap_are_refused_and_drawn_elsewhere():
    async def go():
        # long links only (1 successor): some draws hit full nodes and are refused
        p = TopologyParams(all_to_all_max=2, successors=1, long_links=8, max_degree=5, ondemand_slots=0,
                           ondemand_threshold_bps=0, cycle=60, retry_backoff=0)
        net = Net(20, p)
        await net.pump(8)
        edges = net.up_edges()
        degree = {i: sum(i in e for e in edges) for i in net.ids}
        assert max(degree.values()) <= 5, degree
        assert sum(t.policy.refusals for t in net.nodes.values()) > 0
        assert connected(set(net.ids), edges)
        await net.stop()
    run(go())


def test_forged_stale_and_malformed_lsas_are_dropped_and_counted():
    async def go():
        net = Net(3, TopologyParams(cycle=60))
        a, b, c = net.ids
        t = net.nodes[a]
        await t.on_message(b, LSA_TYPE, {"origin": c, "epoch": 1, "seq": 5, "neighbours": [a]})   # speaks for c
        await t.on_message(b, LSA_TYPE, {"origin": b, "epoch": 1, "seq": "x", "neighbours": []})
        await t.on_message(b, LSA_TYPE, {"origin": b, "epoch": 2, "seq": 3, "neighbours": [c]})
        await t.on_message(b, LSA_TYPE, {"origin": b, "epoch": 2, "seq": 3, "neighbours": [a, c]})  # replay
        await t.on_message(b, LSA_TYPE, {"origin": b, "epoch": 1, "seq": 9, "neighbours": [a]})     # older epoch
        await t.on_message(b, REQUEST, {"role": "emperor"})
        assert t.drops == {"lsa_not_origin": 1, "lsa_malformed": 1, "lsa_stale": 2, "bad_role": 1}, t.drops
        assert t.db.get(b).neighbours == (c,)
        assert t.db.get(c) is None
        await net.stop()
    run(go())


def test_a_drop_closes_both_ends_and_an_unwanted_link_is_not_reopened():
    async def go():
        net = Net(2, TopologyParams(cycle=60))
        a, b = net.ids
        for me, other in ((a, b), (b, a)):
            net.nodes[me].member_appeared(other)
        await net.pump(2)
        assert net.up_edges() == {tuple(sorted((a, b)))}
        await net.nodes[a].on_message(b, DROP, {})
        assert b not in net.open[a]
        assert not net.nodes[a].knows(b)
        await net.stop()
    run(go())
