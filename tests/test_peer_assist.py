"""Peer-assisted traversal in the agent's topology glue (agent/topology.py), without a lab:
three members all-to-all, one pair whose link never comes up (no path between them). The
pair is given up after request_timeout at both ends (link_drop "no_path"), retried only
after the back-off, left out of the graph so the switch app routes it through the third
member, and shown in status as "peer-assisted via" that member, or "unreachable" once the
third member is gone. The real agents, NATs and switch app run in tests/test_peer_assist_lab.py."""

from __future__ import annotations

import asyncio
import re

from rich.console import Console

from ipop_switch.agent.topology import DROP, NO_PATH
from ipop_switch.render import render_status
from ipop_switch.topology import TopologyParams
from tests.helpers.topology_net import Net as _Net, node_id

PARAMS = TopologyParams(request_timeout=30.0, retry_backoff=60.0, cycle=10.0)


def nid(i: int) -> str:
    return node_id("pa", i)


def Net(n: int) -> _Net:
    """On one fake clock; ``blocked`` pairs never come up."""
    return _Net(n, PARAMS, prefix="pa", fake_clock=True)


def row(peers: list[dict], node_id: str) -> dict:
    return next(p for p in peers if p["node_id"] == node_id)


def status_rows(net: Net, me: str) -> list[dict]:
    """What the overlay's snapshot passes: one row per link the node has (up or not)."""
    rows = [{"node_id": p, "subject": f"CN=n{net.ids.index(p)}", "state": "up" if net.up(me, p) else "connecting",
             "path": "srflx" if net.up(me, p) else None} for p in sorted(net.open[me])]
    return net.nodes[me].annotate(rows, lambda n: f"CN=n{net.ids.index(n)}")


def test_a_pair_without_a_path_is_given_up_backed_off_and_reached_through_the_third():
    async def go() -> None:
        net = Net(3)
        a, b, c = net.ids
        net.blocked.add(frozenset((a, b)))
        try:
            await net.pump()
            ta = net.nodes[a]
            # the graph the switch app gets: the failed link is not an edge, the rest is
            assert sorted(map(sorted, net.graphs[a])) == sorted([sorted((a, c)), sorted((b, c))])
            assert ta.routes([b]) == {b: (2, c)}
            r = row(status_rows(net, a), b)
            assert (r["reach"], r["path"], r["via"], r["hops"], r["state"]) == ("peer-assisted", "peer-assisted", c, 2, "connecting")
            assert row(status_rows(net, a), c)["reach"] == "direct"

            # request_timeout passes: both ends give up and back off (link_drop "no_path")
            net.now += PARAMS.request_timeout + 1
            await net.pump()
            drops = [(f, t) for f, t, ty, p in net.sent if ty == DROP and p.get("reason") == NO_PATH]
            assert drops and {frozenset(d) for d in drops} == {frozenset((a, b))}, drops
            for x, y in ((a, b), (b, a)):
                assert net.nodes[x].policy.backoff(y, net.now) is not None, x
                assert y in net.nodes[x].direct_failed and y in net.nodes[x].snapshot()["direct_failed"]
                assert y not in net.open[x]          # the link worker is gone: no ICE meanwhile
            r = row(status_rows(net, a), b)          # a row although no link: backed off, via c
            assert (r["state"], r["reach"], r["via"]) == ("backoff", "peer-assisted", c), r
            assert r["direct_failed"]["failures"] == 1 and 0 < r["direct_failed"]["retry_in_s"] <= PARAMS.retry_backoff

            # no request between them before the back-off ends (the other pairs are left alone)
            before = net.requests(a, b)
            for _ in range(5):
                net.now += PARAMS.cycle
                await net.pump(1)
            assert net.requests(a, b) == before
            # after it, one more attempt; it fails again and the back-off doubles
            net.now += PARAMS.retry_backoff
            await net.pump()
            assert net.requests(a, b) > before
            net.now += PARAMS.request_timeout + 1
            await net.pump()
            rec = net.nodes[a].direct_failed[b]
            assert rec["failures"] == 2, rec
            left, fails = net.nodes[a].policy.backoff(b, net.now)
            assert fails == 2 and PARAMS.retry_backoff < left <= 2 * PARAMS.retry_backoff

            # a path appears: the next attempt brings the link up, the record goes, reach is direct
            net.blocked.clear()
            net.now += 2 * PARAMS.retry_backoff + 1
            await net.pump()
            assert net.up(a, b) and b not in net.nodes[a].direct_failed
            assert row(status_rows(net, a), b)["reach"] == "direct"
        finally:
            await net.stop()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_the_pair_is_unreachable_once_the_middle_member_leaves():
    async def go() -> None:
        net = Net(3)
        a, b, c = net.ids
        net.blocked.add(frozenset((a, b)))
        try:
            await net.pump()
            net.now += PARAMS.request_timeout + 1
            await net.pump()
            net.present.discard(c)
            for m in (a, b):
                if c in net.open[m]:
                    net.open[m].discard(c)
                    net.nodes[m].link_closed(c)
                net.nodes[m].member_left(c)
            await net.pump()
            snap = net.nodes[a].snapshot()
            assert snap["unreachable"] == [b] and snap["reachable"] == 0
            rows = status_rows(net, a)
            assert [r["node_id"] for r in rows] == [b]
            assert rows[0]["reach"] == "unreachable" and rows[0]["via"] is None and rows[0]["state"] == "backoff"
            # and the table a person reads says so
            console = Console(width=200, record=True, color_system=None)
            render_status({"node": {"node_id": a}, "overlays": [{"name": "g", "peers": rows, "topology": snap}]}, console)
            text = console.export_text()
            assert "unreachable" in text and re.search(r"backoff \d+s", text), text
        finally:
            await net.stop()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_status_table_shows_via_the_middle_members_name():
    async def go() -> None:
        net = Net(3)
        a, b, c = net.ids
        net.blocked.add(frozenset((a, b)))
        try:
            await net.pump()
            console = Console(width=220, record=True, color_system=None)
            render_status({"node": {"node_id": a}, "overlays": [{"name": "g", "peers": status_rows(net, a)}]}, console)
            text = console.export_text()
            assert f"peer-assisted via n{net.ids.index(c)} " in text and "hops" not in text, text
        finally:
            await net.stop()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_a_no_path_drop_from_a_peer_we_do_not_know_changes_nothing():
    """A link_drop "no_path" for a link we have no record of (stale, or forged by a member
    that never asked) neither backs us off nor records a failure."""
    async def go() -> None:
        net = Net(3)
        a, b, _ = net.ids
        try:
            await net.pump()
            assert net.up(a, b)
            await net.nodes[a].on_message(b, DROP, {"reason": NO_PATH})   # the link is up: not a path failure
            assert b not in net.nodes[a].direct_failed and net.nodes[a].policy.backoff(b, net.now) is None
            await net.nodes[a].on_message(b, DROP, {"reason": 5})        # odd payloads are a plain drop
            assert b not in net.nodes[a].direct_failed
        finally:
            await net.stop()

    asyncio.run(asyncio.wait_for(go(), 60))
