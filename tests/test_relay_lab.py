"""The relayed path batched, end to end in the lab: an easy-NAT host and a hard-NAT host,
whose only path is through the lab's coturn (docs/tunnel.md §5 "Paths").

One end sends to the peer's relayed address from its host socket (plain UDP GSO to the
relay), the other through its own TURN allocation (UDP GSO of ChannelData-framed segments
to the TURN server); both read their sockets themselves and hand single datagrams on as
bursts. Checked: the link is relayed, both ends send with GSO, TCP bytes arrive intact both
ways, iperf3 runs both ways, and nothing is dropped as malformed, forged or refused.

Two more sites block UDP: their hosts reach the TURN server over TCP only, and their one
path is relay <-> relay through the same coturn (docs/nat.md, "The UDP-blocked pair").
"""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import unique_name
from helpers.link_harness import Mesh
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from test_datapath_lab import serving, stats, tcp_transfer
from test_links_lab import LoopThread

pytestmark = pytest.mark.lab

BAD = ("offload", "auth", "malformed", "unknown_index", "not_ours", "gso_send_error", "send_error")


@pytest.fixture(scope="module")
def world():
    lab = Lab(LabSpec(name=unique_name("r"), sites=(SiteSpec("e1", "easy"), SiteSpec("h1", "hard"),
                                                    SiteSpec("u1", "easy", udp_blocked=True),
                                                    SiteSpec("u2", "easy", udp_blocked=True))))
    lt = LoopThread()
    mesh = None
    try:
        lab.up()
        mesh = Mesh(lab)
        a, b = "e1h1", "h1h1"
        lt.run(mesh.start(list(lab.hosts)), 60)
        lp = lt.run(mesh.open(a, b, index=1, port_prediction=False), 60)   # hard<->easy: stay relayed
        lt.run(mesh.wait_up(lp, 40), 60)
        yield lab, mesh, lt, lp
    finally:
        try:
            if mesh is not None:
                lt.run(mesh.stop(), 60)
        finally:
            lt.stop()
            lab.down()


def _bad(s: dict) -> dict:
    return {k: v for k, v in s["drops"].items() if k.startswith(BAD)}


def test_relayed_link_sends_with_gso_and_keeps_tcp_bytes_intact(world):
    lab, mesh, lt, lp = world
    a, b = lp.a.host, lp.b.host
    sa0, sb0 = stats(lt, lp.a, lp.link_id), stats(lt, lp.b, lp.link_id)
    assert sa0["path"] == sb0["path"] == "relay", (sa0, sb0)
    for src, dst, addr, port in ((a, b, lp.addr_b, 7201), (b, a, lp.addr_a, 7202)):
        sent, got = tcp_transfer(lab, src, dst, addr, 24_000_000, port)
        assert got == sent, f"{src}->{dst}"
    sa, sb = stats(lt, lp.a, lp.link_id), stats(lt, lp.b, lp.link_id)
    for s, s0 in ((sa, sa0), (sb, sb0)):
        assert not _bad(s), s["drops"]
        assert s["tx_super"] > s0["tx_super"] and s["rx_coalesced"] > s0["rx_coalesced"]
        # the segments left in GSO sends, several per send, through the relay both ways
        assert s["tx_gso"] > s0["tx_gso"]
        assert s["tx_packets"] - s0["tx_packets"] > 4 * (s["tx_gso"] - s0["tx_gso"])


def test_relayed_link_carries_iperf3_both_ways(world):
    lab, mesh, lt, lp = world
    a, b = lp.a.host, lp.b.host
    for reverse in (False, True):
        srv = lab.popen(b, ["iperf3", "-s", "-1", "-B", lp.addr_b, "-p", "7301"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        try:
            serving(lab, b, "tcp", 7301)
            r = lab.exec(a, ["iperf3", "-c", lp.addr_b, "-p", "7301", "-t", "3", "-J", "--connect-timeout", "5000"]
                         + (["-R"] if reverse else []), timeout=40, check=False)
            mbit = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
            assert mbit > 50, (reverse, mbit)
        finally:
            srv.kill()
            srv.wait(5)
    for end in (lp.a, lp.b):
        s = stats(lt, end, lp.link_id)
        assert s["path"] == "relay" and not _bad(s), s


def test_two_udp_blocked_sites_link_relay_to_relay(world):
    """Both ends on TURN over TCP, no srflx: each relay must not be paired with the other's
    LAN address (coturn would drop the allocation at the unroutable send), so relay <-> relay
    is left and wins."""
    lab, mesh, lt, _ = world
    lp = lt.run(mesh.open("u1h1", "u2h1", index=2, transport_a="tcp", transport_b="tcp"), 60)
    lt.run(mesh.wait_up(lp, 40), 60)
    sa, sb = stats(lt, lp.a, lp.link_id), stats(lt, lp.b, lp.link_id)
    for s in (sa, sb):
        assert s["path"] == "relay" and s["candidates"] == "relay->relay", s
    r = lt.run(mesh.ping("u1h1", lp.addr_b, count=5), 30)
    assert r.returncode == 0, r.stdout
    sent, got = tcp_transfer(lab, "u2h1", "u1h1", lp.addr_a, 4_000_000, 7203)
    assert got == sent
    for end in (lp.a, lp.b):
        s = stats(lt, end, lp.link_id)
        assert s["path"] == "relay" and not _bad(s), s
