"""GroupVPN end to end in the lab: real agents (ipop-switch up), real Prosody, coturn, OVS,
the OpenFlow app and tunnel workers, across none/one2one/easy/hard NATs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import helper, unique_name
from helpers.wait import listening, readline_within, wait_until
from ipop_switch.bridge.overlay_bridge import stable_mac
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.lab.probes import first_ping, wait_links
from ipop_switch.errors import IpopError
from ipop_switch.lab.nodes import LabGroup

LINKS_TIMEOUT = 60.0
REJOIN_TIMEOUT = 30.0
# which pairs can punch a direct path; the rest go through TURN (hard NAT's port-dependent
# mapping meets easy NAT's port-dependent filtering)
RELAYED = {frozenset({"easy", "hard"})}


def ping_ok(lab: Lab, host: str, addr: str, count: int = 2) -> bool:
    return lab.exec(host, ["ping", "-c", str(count), "-i", "0.2", "-W", "2", addr], check=False, timeout=30).returncode == 0


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """``ipop-switch ARGS`` as a user runs it (wide columns: the status line is read whole)."""
    return subprocess.run([sys.executable, "-m", "ipop_switch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=True, env={**os.environ, "COLUMNS": "400"})


def need_c_loops() -> None:
    """The test environment always builds the C loops (bootstrap installs gcc and libssl-dev):
    a missing extension is a broken set-up, not a reason to test less."""
    assert importlib.util.find_spec("ipop_switch.tunnel._fastpath") is not None, \
        "the C extension ipop_switch/tunnel/_fastpath is not built: run ./bootstrap.sh test (gcc, libssl-dev)"
    assert not os.environ.get("IPSW_NO_ACCEL"), "IPSW_NO_ACCEL is set: the agents would run the Python loops"


def agents_running(g: LabGroup) -> None:
    """Fail at once, with its log, if an agent has exited (instead of timing out on its socket)."""
    for h, node in g.nodes.items():
        if node.proc is not None and node.proc.poll() is not None:
            log = node.dir / "agent.log"
            tail = log.read_text()[-2000:] if log.exists() else "(no log)"
            raise AssertionError(f"the agent on {h} exited with {node.proc.returncode}:\n{tail}")


def peer_by_id(st: dict, node_id: str, overlay: int = 0) -> dict | None:
    return next((p for p in st["overlays"][overlay]["peers"] if p["node_id"] == node_id), None)


@pytest.fixture(scope="module")
def net():
    """Four nodes behind none, one2one, easy and hard NATs (plus a spare host for late joins)."""
    lab = Lab(LabSpec(name=unique_name("g"), sites=(
        SiteSpec("pub", "none"), SiteSpec("one", "one2one"), SiteSpec("easy", "easy"), SiteSpec("hard", "hard"),
        SiteSpec("late", "easy"))))
    group = None
    try:
        lab.up()
        # easy<->hard stays on TURN here (this file checks the relayed path; prediction: test_nat_paths_lab)
        group = LabGroup(lab, "grp", net=99, extra={"port_prediction": False})
        for h in ("pubh1", "oneh1", "easyh1", "hardh1"):
            group.add(h)
            group.start(h)
        assert wait_links(group, timeout=LINKS_TIMEOUT) is not None, "links did not all come up"
        yield lab, group
    finally:
        if group:
            group.stop_all()
        lab.down()


def test_all_pairs_ping_v4_v6_over_expected_paths(net):
    lab, g = net
    hosts = list(g.nodes)
    for a in hosts:
        st = g.status(a)
        for b in hosts:
            if a == b:
                continue
            assert ping_ok(lab, a, g.nodes[b].ip), f"{a} -> {b} IPv4"
            assert ping_ok(lab, a, g.nodes[b].ip6), f"{a} -> {b} IPv6"
            p = peer_by_id(st, g.nodes[b].node_id)
            kinds = frozenset({lab.host(a).nat, lab.host(b).nat})
            want = "relay" if kinds in RELAYED else "direct"
            assert p["state"] == "up" and p["path"] == want, (a, b, p)
    # ARP went through the overlay: the neighbour MAC is the peer's bridge MAC (not its TAP's)
    for b in hosts[1:]:
        neigh = lab.exec(hosts[0], ["ip", "neigh", "show", g.nodes[b].ip]).stdout
        assert stable_mac(g.nodes[b].node_id, "grp") in neigh, neigh


def test_status_reports_the_c_tunnel_loops(net):
    """What ``ipop-switch status`` shows (JSON and the text a person reads): the tunnel loops run in C."""
    need_c_loops()
    lab, g = net
    for h, node in g.nodes.items():
        st = json.loads(cli("status", "-c", str(node.config), "--json").stdout)
        assert st["node"]["tunnel_loops"] == "c", (h, st["node"])
        text = cli("status", "-c", str(node.config)).stdout
        head = next((l for l in text.splitlines() if l.startswith("node ")), None)
        assert head is not None, text
        assert node.node_id in head and head.rstrip().endswith("tunnel loops in c"), (h, head)


def test_iperf3_tcp_over_the_overlay(net):
    lab, g = net
    a, b = "pubh1", "hardh1"
    server = lab.popen(b, ["iperf3", "-s", "-1", "-B", g.nodes[b].ip], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(lambda argv: lab.exec(b, argv), "tcp", 5201), 10, "iperf3 -s listening")
        r = lab.exec(a, ["iperf3", "-c", g.nodes[b].ip, "-t", "3", "-J", "--connect-timeout", "3000"], timeout=40)
        end = json.loads(r.stdout)["end"]
        assert end["sum_received"]["bytes"] > 10_000_000, end["sum_received"]
    finally:
        server.kill()
        server.wait(timeout=5)


def test_dhcp_served_over_the_overlay(net):
    lab, g = net
    leases = g.dir / "dnsmasq.leases"
    dnsmasq = lab.popen("pubh1", ["dnsmasq", "--no-daemon", "--port=0", "--interface=ipswgrp", "--bind-interfaces",
                                  "--dhcp-range=100.99.200.10,100.99.200.50,255.255.0.0,10m",
                                  f"--dhcp-leasefile={leases}", "--no-resolv", "--no-hosts"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(lambda argv: lab.exec("pubh1", argv), "udp", 67), 10, "dnsmasq on UDP 67")
        got = {}
        for i, h in enumerate(("oneh1", "easyh1", "hardh1")):
            mac = f"02:dc:00:00:00:{i + 1:02x}"
            out = lab.exec(h, helper("dhcp_client") + ["ipswgrp", mac, "5"], timeout=40).stdout
            got[h] = json.loads(out)
        addrs = [v["ack"] for v in got.values()]
        assert all(a and a.startswith("100.99.200.") for a in addrs), got
        assert len(set(addrs)) == 3
        assert all(v["server"] == g.nodes["pubh1"].ip for v in got.values())
    finally:
        dnsmasq.kill()
        dnsmasq.wait(timeout=5)


def test_mdns_query_reaches_every_node_exactly_once(net, tmp_path):
    lab, g = net
    mcast = helper("switch_mcast")
    receivers = {}
    for h in ("oneh1", "easyh1", "hardh1"):
        out = tmp_path / f"{h}.json"
        receivers[h] = (lab.popen(h, mcast + ["recv", "--iface", "ipswgrp", "--listen", "udp4", "224.0.0.251:5353",
                                               "--out", str(out), "--duration", "6"]), out)
    wait_until(lambda: all(Path(str(o) + ".ready").exists() for _, o in receivers.values()), 10, "mDNS receivers ready")
    lab.exec("pubh1", mcast + ["send", "--iface", "ipswgrp", "--send", "udp4", "224.0.0.251:5353",
                               "--count", "10", "--rate", "20", "--tag", "mdns"], timeout=20)
    for h, (p, out) in receivers.items():
        p.wait(timeout=20)
        counts = json.loads(out.read_text())["udp4 224.0.0.251:5353"]
        mine = {k: v for k, v in counts.items() if k.startswith("mdns-")}
        assert len(mine) == 10 and set(mine.values()) == {1}, (h, counts)


def test_killed_node_rejoins_and_others_are_undisturbed(net):
    lab, g = net
    others = ("pubh1", "oneh1", "hardh1")
    before = {h: {p["node_id"]: p["ups"] for p in g.status(h)["overlays"][0]["peers"]} for h in others}
    g.stop("easyh1", kill=True)
    t0 = time.monotonic()
    g.start("easyh1")
    took = first_ping(lab, "pubh1", g.nodes["easyh1"].ip, timeout=REJOIN_TIMEOUT)
    assert took is not None, "the restarted node is not reachable"
    assert time.monotonic() - t0 < REJOIN_TIMEOUT
    assert wait_links(g, timeout=LINKS_TIMEOUT) is not None
    easy_id = g.nodes["easyh1"].node_id
    for h in others:
        after = {p["node_id"]: p["ups"] for p in g.status(h)["overlays"][0]["peers"]}
        for peer, ups in before[h].items():
            if peer != easy_id:
                assert after[peer] == ups, f"{h}'s link to {peer} went down and up again"
    assert ping_ok(lab, "hardh1", g.nodes["easyh1"].ip)


def test_prosody_outage_keeps_links_and_late_node_joins(net):
    lab, g = net
    lab.stop_service("prosody")
    try:
        offline = lambda h: g.status(h)["overlays"][0]["signaling"]["state"].startswith("offline")
        wait_until(lambda: offline("oneh1") and offline("hardh1"), 30, "the agents to see signaling go offline")
        # 30 s without signaling: traffic still flows, every ping answered
        r = lab.exec("oneh1", ["ping", "-c", "30", "-i", "1", "-W", "2", g.nodes["hardh1"].ip], check=False, timeout=60)
        assert " 30 received" in r.stdout, r.stdout
        assert offline("oneh1") and offline("hardh1"), "signaling came back during the outage"
    finally:
        lab.start_service("prosody")
    g.add("lateh1")
    g.start("lateh1")
    assert wait_links(g, timeout=LINKS_TIMEOUT) is not None, "the late node did not link with everyone"
    for h in ("pubh1", "oneh1", "easyh1", "hardh1"):
        assert ping_ok(lab, "lateh1", g.nodes[h].ip)
    g.stop("lateh1")


def test_two_overlays_on_the_same_nodes_stay_isolated(lab_factory, tmp_path):
    lab = lab_factory(LabSpec(name=unique_name(), sites=(SiteSpec("a", "none"), SiteSpec("b", "easy"))))
    g = LabGroup(lab, overlays={"red": 97, "blue": 98})
    try:
        for h in ("ah1", "bh1"):
            g.add(h)
            g.start(h)
        def both_up() -> bool:
            agents_running(g)
            sts = [g.status(h) for h in ("ah1", "bh1")]
            return all(len(o["peers"]) == 1 and o["peers"][0]["state"] == "up" for st in sts for o in st["overlays"])
        # IpopError: an agent's status socket is not there yet
        wait_until(both_up, LINKS_TIMEOUT, "links of both overlays up", interval=0.3, retry_on=(IpopError,))
        for ov in ("red", "blue"):
            assert ping_ok(lab, "ah1", g.address("bh1", ov))
        # a broadcast in red is never seen in blue (receivers bound to each bridge interface)
        procs = {ov: lab.popen("bh1", helper("bcast_count") + [f"ipsw{ov}", "9999", "4"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for ov in ("red", "blue")}
        for p in procs.values():
            assert readline_within(p.stderr, 10, "bcast_count ready").strip() == "ready"
        mcast = helper("switch_mcast")
        lab.exec("ah1", mcast + ["send", "--iface", "ipswred", "--send", "udp4", "255.255.255.255:9999",
                                 "--count", "5", "--rate", "20", "--tag", "red"], timeout=20)
        got = {ov: json.loads(p.communicate(timeout=20)[0])["payloads"] for ov, p in procs.items()}
        assert sum(v for k, v in got["red"].items() if k.startswith("red-")) == 5, got
        assert not any(k.startswith("red-") for k in got["blue"]), got
    finally:
        g.stop_all()


def _up(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ipop_switch.cli", "up", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_broken_config_is_one_line_error(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text('[[overlay]]\nname = "x"\naddress = "100.99.0.1/16"\nmtu = 99\n'
                   '[overlay.xmpp]\nserver = "198.18.0.1"\njid = "a@ipsw.test"\npassword = "p"\n')
    r = _up(["-c", str(cfg)])
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"ipop-switch: error: {cfg}: overlay[0].mtu: expected int >= 1280"]
    r = _up(["-c", str(tmp_path / "missing.toml")])
    assert r.returncode == 1 and "no such config file" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_ovs_and_a_refused_xmpp_login_are_one_line_errors(lab_factory, tmp_path):
    lab = lab_factory(LabSpec(name=unique_name(), sites=(SiteSpec("a", "none"),)))
    g = LabGroup(lab, "solo")
    node = g.add("ah1")
    ns = lab.netns_of("ah1")
    # missing OVS: a PATH without it
    env_path = f"{Path(sys.executable).parent}:/nonexistent-bin"
    r = subprocess.run(["ip", "netns", "exec", ns, "env", f"PATH={env_path}", sys.executable, "-m", "ipop_switch.cli",
                        "up", "-c", str(node.config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("ipop-switch: error: ovsdb-server not found"), r.stderr
    # a refused login ends the node with one line (an unreachable server is retried instead:
    # tests/test_xmpp_cluster_lab.py)
    bad = node.config.with_name("bad-password.toml")
    bad.write_text(node.config.read_text().replace(lab.host("ah1").xmpp_password, "not-the-password"))
    t0 = time.monotonic()
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "ipop_switch.cli", "up", "-c", str(bad)],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 1
    err = [l for l in r.stderr.splitlines() if l.startswith("ipop-switch: error:")]
    assert len(err) == 1 and "XMPP login as ah1@ipsw.test refused" in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 60
    # and it left nothing running: no OVS of its own
    assert subprocess.run(["pgrep", "-f", str(node.dir)], capture_output=True).returncode == 1
