"""The batched datapath end to end in the lab: real OVS bridges (userspace datapath, TSO on),
real TAPs, iperf3, ping with DF, and data checked byte for byte.

Three links between two public hosts, each with its own bridge and subnet:
  1 "batched":   both ends take offloads (TSO super-frames, per-segment AEAD, GSO, coalescing);
  2 "perpacket": offloads refused by spec on both ends (the per-packet path of an older peer);
  3 "mixed":     b's bridge has no TSO (LOCAL port tso off, bridge_tso=False in its spec):
                 a sends b complete frames, b sends a segments that a coalesces.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import unique_name
from helpers.link_harness import LinkPair, Mesh
from helpers.wait import listening, wait_until
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.tunnel import LinkSpec
from test_links_lab import LoopThread

pytestmark = pytest.mark.lab

HELPER = str(Path(__file__).parent / "helpers" / "dp_check.py")
MTU = 1400
LINKS = {"batched": (1, {}, {}), "perpacket": (2, {"offload": False}, {"offload": False}),
         "mixed": (3, {}, {"bridge_tso": False})}
EXPECTED_MODE = {"batched": ("batched/coalescing", "batched/coalescing"),
                 "perpacket": ("per-packet", "per-packet"),
                 "mixed": ("per-packet/coalescing", "batched")}


async def open_link(mesh: Mesh, a: str, b: str, index: int, kw_a: dict, kw_b: dict) -> LinkPair:
    """Like Mesh.open, with per-end LinkSpec fields."""
    na, nb = mesh.nodes[a], mesh.nodes[b]
    link_id = f"D{index}-{a}-{b}"
    br = f"ipswb{index}"
    lp = LinkPair(link_id, na, nb, index, f"100.97.{index}.1", f"100.97.{index}.2", br)
    mesh.links[link_id] = lp
    t = mesh.lab.services()["turn"]
    specs = []
    for me, peer, addr, kw in ((na, nb, lp.addr_a, kw_a), (nb, na, lp.addr_b, kw_b)):
        await me.req("bridge", name=br, addr=f"{addr}/24", mtu=MTU)
        specs.append(LinkSpec(link_id=link_id, peer_id=peer.node_id, controlling=me.node_id > peer.node_id,
                              local_static=me.key_priv, peer_static=peer.key_pub, tap=f"ipt{index}",
                              mtu=MTU, stun=(t["address"], t["port"]), turn=mesh.turn(), **kw))
    lp.opened_at = time.monotonic()
    await asyncio.gather(na.req("open", spec=specs[0].to_json(), bridge=br),
                         nb.req("open", spec=specs[1].to_json(), bridge=br))
    await mesh.wait_up(lp, 30)
    return lp


@pytest.fixture(scope="module")
def world():
    lab = Lab(LabSpec(name=unique_name("d"), sites=(SiteSpec("p1", "none"), SiteSpec("p2", "none"))))
    lt = LoopThread()
    mesh = None
    try:
        lab.up()
        mesh = Mesh(lab)
        a, b = list(lab.hosts)
        lt.run(mesh.start([a, b]), 60)
        links = {}
        for name, (idx, kw_a, kw_b) in LINKS.items():
            links[name] = lt.run(open_link(mesh, a, b, idx, kw_a, kw_b), 60)
        # "TSO off on the bridge": b's LOCAL port of the mixed link segments in the host stack
        lab.exec(b, ["ethtool", "-K", f"ipswb{LINKS['mixed'][0]}", "tso", "off"])
        yield lab, mesh, lt, links
    finally:
        try:
            if mesh is not None:
                lt.run(mesh.stop(), 60)     # raises if a relayed signaling message was lost
        finally:
            lt.stop()
            lab.down()


def serving(lab, host: str, proto: str, port: int) -> None:
    """Wait until a server started in ``host`` listens (a client started earlier is refused)."""
    wait_until(lambda: listening(lambda argv: lab.exec(host, argv), proto, port), 10, f"{proto} {port} listening on {host}")


def stats(lt, node, link_id) -> dict:
    return lt.run(node.link_stats(link_id), 20)


def tcp_transfer(lab, src: str, dst: str, addr: str, nbytes: int, port: int) -> tuple[dict, dict]:
    srv = lab.popen(dst, [sys.executable, HELPER, "tcp-server", addr, str(port)], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
    try:
        serving(lab, dst, "tcp", port)
        cl = lab.exec(src, [sys.executable, HELPER, "tcp-client", addr, str(port), str(nbytes)], timeout=90)
        out, err = srv.communicate(timeout=60)
        return json.loads(cl.stdout), json.loads(out or "{}")
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait(5)


@pytest.mark.parametrize("name", list(LINKS))
def test_negotiated_mode_is_reported(world, name):
    lab, mesh, lt, links = world
    lp = links[name]
    got = (stats(lt, lp.a, lp.link_id)["datapath"], stats(lt, lp.b, lp.link_id)["datapath"])
    assert got == EXPECTED_MODE[name]


@pytest.mark.parametrize("name", list(LINKS))
def test_tcp_bytes_intact_both_ways(world, name):
    lab, mesh, lt, links = world
    lp = links[name]
    a, b = lp.a.host, lp.b.host
    before_a, before_b = stats(lt, lp.a, lp.link_id), stats(lt, lp.b, lp.link_id)
    for src, dst, addr, port in ((a, b, lp.addr_b, 7101), (b, a, lp.addr_a, 7102)):
        sent, got = tcp_transfer(lab, src, dst, addr, 24_000_000, port)
        assert got == sent, f"{name} {src}->{dst}"
    sa, sb = stats(lt, lp.a, lp.link_id), stats(lt, lp.b, lp.link_id)
    for s in (sa, sb):
        assert not {k: v for k, v in s["drops"].items() if k.startswith(("offload", "auth", "malformed"))}, s["drops"]
    if name == "batched":
        for s, b0 in ((sa, before_a), (sb, before_b)):
            assert s["tx_super"] > b0["tx_super"] and s["rx_coalesced"] > b0["rx_coalesced"]
            assert s["tx_packets"] - b0["tx_packets"] > 5 * (s["tx_frames"] - b0["tx_frames"]) / 4
    elif name == "perpacket":
        assert sa["tx_super"] == sb["tx_super"] == sa["rx_coalesced"] == sb["rx_coalesced"] == 0
    else:
        assert sa["tx_super"] == 0 and sb["rx_coalesced"] == 0          # nothing offloaded towards b
        # b's host stack segments (LOCAL port TSO off): b reads MSS frames, no super-frames,
        # sends them in format v2 one by one, and a coalesces them
        assert sb["tx_super"] == before_b["tx_super"] and sa["rx_coalesced"] > before_a["rx_coalesced"]


@pytest.mark.parametrize("name", list(LINKS))
def test_every_datagram_size_up_to_the_mtu_with_df(world, name):
    lab, mesh, lt, links = world
    lp = links[name]
    a, b = lp.a.host, lp.b.host
    maxsize = MTU - 28
    echo = lab.popen(b, [sys.executable, HELPER, "udp-echo", lp.addr_b, "7200", "60"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        serving(lab, b, "udp", 7200)
        r = lab.exec(a, [sys.executable, HELPER, "udp-sizes", lp.addr_b, "7200", str(maxsize)], timeout=120)
        res = json.loads(r.stdout)
        assert res["bad"] == 0 and res["lost"] <= 2 and res["ok"] >= maxsize - 2, res
    finally:
        echo.kill()
        echo.wait(5)
    ok = lab.exec(a, ["ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", "-M", "do", "-s", str(maxsize), lp.addr_b],
                  check=False)
    assert ok.returncode == 0, ok.stdout
    too_big = lab.exec(a, ["ping", "-n", "-c", "1", "-W", "1", "-M", "do", "-s", str(maxsize + 1), lp.addr_b],
                       check=False)
    assert too_big.returncode != 0


@pytest.mark.parametrize("name", list(LINKS))
def test_iperf3_both_directions(world, name):
    lab, mesh, lt, links = world
    lp = links[name]
    a, b = lp.a.host, lp.b.host
    for reverse in (False, True):
        srv = lab.popen(b, ["iperf3", "-s", "-1", "-B", lp.addr_b, "-p", "7301"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        try:
            serving(lab, b, "tcp", 7301)
            r = lab.exec(a, ["iperf3", "-c", lp.addr_b, "-p", "7301", "-t", "2", "-J", "--connect-timeout", "5000"]
                         + (["-R"] if reverse else []), timeout=40, check=False)
            mbit = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
            assert mbit > 50, (name, reverse, mbit)
        finally:
            srv.kill()
            srv.wait(5)


def test_peer_address_resolves_to_the_bridge_not_the_tap(world):
    """The host stack stays off the TAPs: ARP for b's bridge address answers b's bridge MAC."""
    lab, mesh, lt, links = world
    lp = links["batched"]
    lab.exec(lp.a.host, ["ping", "-n", "-c", "1", "-W", "2", lp.addr_b], check=False)
    neigh = lab.exec(lp.a.host, ["ip", "-j", "neigh", "show", lp.addr_b]).stdout
    mac = json.loads(neigh)[0]["lladdr"]
    bridge_mac = json.loads(lab.exec(lp.b.host, ["ip", "-j", "link", "show", lp.bridge]).stdout)[0]["address"]
    tap_mac = json.loads(lab.exec(lp.b.host, ["ip", "-j", "link", "show", f"ipt{lp.index}"]).stdout)[0]["address"]
    assert mac == bridge_mac and mac != tap_mac
