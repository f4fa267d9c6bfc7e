"""Peer-assisted traversal with real agents (issue 19 item 3): two members behind `hard` NATs
(endpoint-dependent mapping), no TURN configured and UDP dropped between their public
addresses, so no direct path exists between them; a third, public member links to both.
Their ping and TCP cross the third member (its links carry the bytes), a broadcast reaches
each node exactly once over the partial mesh, both ends give the direct link up and back
off instead of retrying all the time, status says "peer-assisted via" the third member,
and when it leaves the pair is reported unreachable (no crash)."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time

import pytest
from rich.console import Console

from conftest import helper, unique_name
from helpers.wait import readline_within, wait_until
from ipop_switch.errors import IpopError
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.lab.nodes import LabGroup
from ipop_switch.lab.probes import iperf
from ipop_switch.render import render_status

pytestmark = [pytest.mark.lab, pytest.mark.slow]

OV = "pa"
# short timers so the give-up and the back-off happen within the test (defaults: 30 s, 60 s, 10 s)
TOPOLOGY = {"request_timeout": 12.0, "retry_backoff": 20.0, "cycle": 2.0}
MID, A, B = "pubh1", "hah1", "hbh1"
SETTLE_TIMEOUT = 60.0


def rows(g: LabGroup, h: str) -> dict[str, dict]:
    """node id -> status row of each peer, as ``ipop-switch status --json`` has it."""
    return {p["node_id"]: p for p in g.status(h)["overlays"][0]["peers"]}


def reach(g: LabGroup, h: str, other: str) -> dict | None:
    return rows(g, h).get(g.nodes[other].node_id)


def assisted(g: LabGroup) -> bool:
    """A and B reach each other through MID, and both have their links to MID up."""
    mid = g.nodes[MID].node_id
    for x, y in ((A, B), (B, A)):
        r, m = reach(g, x, y), reach(g, x, MID)
        if not (r and m and r["reach"] == "peer-assisted" and r["via"] == mid and r["hops"] == 2
                and m["state"] == "up"):
            return False
    return True


def block_udp_between(lab: Lab, a: str, b: str) -> None:
    """No UDP between a's host and b's public address (its NAT's), either way: with no TURN
    and both behind hard NATs there is no direct path anyway; this makes it certain whatever
    port prediction tries."""
    other = lab.host(b).public_ip
    rules = (f"table inet ipswpa {{\n"
             f" chain o {{ type filter hook output priority 0; ip daddr {other} meta l4proto udp drop; }}\n"
             f" chain i {{ type filter hook input priority 0; ip saddr {other} meta l4proto udp drop; }}\n"
             f"}}\n")
    lab.exec(a, ["nft", "-f", "-"], input=rules)


@pytest.fixture(scope="module")
def trio():
    lab = Lab(LabSpec(name=unique_name("pa"), sites=(SiteSpec("pub", "none"), SiteSpec("ha", "hard"),
                                                      SiteSpec("hb", "hard"))))
    group = None
    try:
        lab.up()
        block_udp_between(lab, A, B)
        group = LabGroup(lab, OV, net=96, extra={"no_turn": True, "topology": TOPOLOGY})
        for h in (MID, A, B):
            group.add(h)
        t0 = time.monotonic()
        for h in (MID, A, B):
            group.start(h)
        wait_until(lambda: assisted(group), SETTLE_TIMEOUT, f"{A} and {B} to reach each other via {MID}",
                   interval=0.5, retry_on=(IpopError, KeyError, TypeError))
        print(f"\n{A} <-> {B} peer-assisted via {MID} {time.monotonic() - t0:.1f} s after the agents started")
        yield lab, group
    finally:
        if group:
            group.stop_all()
        lab.down()


def addr(g: LabGroup, h: str) -> str:
    return g.nodes[h].address.split("/")[0]


def status_text(g: LabGroup, h: str) -> str:
    """What ``ipop-switch status`` prints on a wide terminal (the CLI renders the same JSON
    with ``render_status``; on a pipe it wraps at 140 columns)."""
    console = Console(width=250, record=True, color_system=None)
    render_status(g.status(h), console)
    return console.export_text()


def rtt(lab: Lab, h: str, to: str) -> float:
    """Median RTT (ms) of 20 pings (a median: one slow reply on the shared cores is not the path)."""
    r = lab.exec(h, ["ping", "-n", "-c", "20", "-i", "0.1", "-W", "2", to], check=False, timeout=30)
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", r.stdout)]
    assert r.returncode == 0 and len(times) >= 19, r.stdout
    return statistics.median(times)


def test_ping_and_tcp_cross_the_middle_member(trio):
    lab, g = trio
    a_mid, b_mid = g.nodes[A].node_id, g.nodes[B].node_id
    for to in (MID, B):      # warm-up: ARP answered, flows in place (the first seconds go to the app)
        lab.exec(A, ["ping", "-c", "10", "-i", "0.1", "-W", "2", addr(g, to)], check=False, timeout=30)
    direct_rtt, assisted_rtt = rtt(lab, A, addr(g, MID)), rtt(lab, A, addr(g, B))
    before = rows(g, MID)
    secs = 3
    direct_mbit = iperf(lab, A, MID, addr(g, MID), seconds=secs)
    mid_before = rows(g, MID)
    assisted_mbit = iperf(lab, A, B, addr(g, B), seconds=secs)
    after = rows(g, MID)
    print(f"\nRTT {A}->{MID} (direct) {direct_rtt:.2f} ms, {A}->{B} (via {MID}) {assisted_rtt:.2f} ms; "
          f"iperf3 direct {direct_mbit:.0f} Mbit/s, via {MID} {assisted_mbit:.0f} Mbit/s")
    assert assisted_mbit and assisted_mbit > 10, assisted_mbit
    # the bytes crossed the middle member: in on its link from A, out on its link to B
    sent = assisted_mbit * 1e6 * secs / 8
    got_from_a = after[a_mid]["rx_bytes"] - mid_before[a_mid]["rx_bytes"]
    gave_to_b = after[b_mid]["tx_bytes"] - mid_before[b_mid]["tx_bytes"]
    assert got_from_a > 0.8 * sent and gave_to_b > 0.8 * sent, (sent, got_from_a, gave_to_b, before)
    # and A has no link of its own to B carrying anything
    r = reach(g, A, B)
    assert r["state"] != "up" and r["reach"] == "peer-assisted" and not r.get("port"), r


def test_a_broadcast_reaches_each_node_exactly_once(trio):
    lab, g = trio
    procs = {h: lab.popen(h, helper("bcast_count") + [f"ipsw{OV}", "9999", "4"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) for h in (MID, B)}
    try:
        for p in procs.values():
            assert readline_within(p.stderr, 10, "bcast_count ready").strip() == "ready"
        lab.exec(A, helper("switch_mcast") + ["send", "--iface", f"ipsw{OV}", "--send", "udp4", "255.255.255.255:9999",
                                              "--count", "5", "--rate", "20", "--tag", "pa"], timeout=20)
        got = {h: json.loads(p.communicate(timeout=20)[0])["payloads"] for h, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for h, payloads in got.items():
        mine = {k: v for k, v in payloads.items() if k.startswith("pa-")}
        assert len(mine) == 5 and set(mine.values()) == {1}, (h, payloads)


def test_both_ends_give_the_direct_link_up_and_back_off(trio):
    lab, g = trio
    for x, y in ((A, B), (B, A)):
        r = wait_until(lambda: (r := reach(g, x, y)) and r.get("direct_failed") and r, 2 * TOPOLOGY["request_timeout"] + 10,
                       f"{x} to record no direct path to {y}", interval=0.5)
        assert r["direct_failed"]["failures"] >= 1 and r["reach"] == "peer-assisted", r
    # while backed off there is no link worker at all (no ICE checks, no gathering)
    r = wait_until(lambda: (r := reach(g, A, B)) and r["state"] == "backoff" and r, 2 * TOPOLOGY["request_timeout"] + 10,
                   f"{A} backed off from {B}", interval=0.5)
    assert 0 < r["direct_failed"]["retry_in_s"] <= 8 * TOPOLOGY["retry_backoff"], r
    # attempts are bounded: one at the start, then one per back-off (20 s, 40 s, ...)
    log = (g.nodes[A].dir / "agent.log").read_text()
    opens = len(re.findall(rf"event=link_open overlay={OV} peer={g.nodes[B].node_id}", log))
    assert 1 <= opens <= 3, opens
    # the status table a person reads
    text = status_text(g, A)
    assert re.search(rf"hbh1 .*backoff \d+s .*peer-assisted via {MID} ", text), text


def test_when_the_middle_member_leaves_the_pair_is_unreachable(trio):
    lab, g = trio
    g.stop(MID)
    def alone(x: str, y: str) -> dict | None:
        """x's row for y once the middle member is gone from x's view and y unreachable."""
        r = reach(g, x, y)
        gone = g.status(x)["overlays"][0]["topology"]["members"] == 2
        return r if gone and r and r["reach"] == "unreachable" else None

    for x, y in ((A, B), (B, A)):
        r = wait_until(lambda: alone(x, y), 30, f"{x} to report {y} unreachable", interval=0.5)
        assert r["via"] is None and r["path"] is None, r
        topo = g.status(x)["overlays"][0]["topology"]
        assert topo["unreachable"] == [g.nodes[y].node_id] and topo["reachable"] == 0, topo
        assert g.nodes[x].proc.poll() is None, f"the agent on {x} exited"
    r = lab.exec(A, ["ping", "-c", "2", "-i", "0.2", "-W", "1", addr(g, B)], check=False, timeout=15)
    assert r.returncode != 0, r.stdout
    out = subprocess.run([sys.executable, "-m", "ipop_switch.cli", "status", "-c", str(g.nodes[A].config)],
                         capture_output=True, text=True, timeout=30)      # the command itself
    assert out.returncode == 0 and re.search(r"hbh1 .*unreachable", out.stdout), out.stdout + out.stderr
