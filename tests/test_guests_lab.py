"""Guests in switch mode, end to end: real agents behind none, easy and hard NATs, each with
three container namespaces plugged into its overlay bridge, two of them from the node
config (``[[overlay.attach]]``) and one at run time (``ipop-switch attach``): every guest
reaches every other guest and every node, IPv4 and IPv6; status lists them; detaching
takes the port and its veth away; attach/detach in a loop leaks nothing; bad requests
are one clear line and disturb nothing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

from conftest import unique_name
from helpers.agent_lab import cli, links, status_json, until
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.lab.nodes import LabGroup
from ipop_switch.lab.probes import wait_links

pytestmark = [pytest.mark.lab, pytest.mark.slow]

HOSTS = {"pubh1": 1, "easyh1": 2, "hardh1": 3}
LINKS_TIMEOUT = 60.0


def guest_addr(node: int, j: int, v6: bool = False) -> str:
    return f"fd00:99::{node}:{j}" if v6 else f"100.99.{10 + node}.{j}"


def guest_mac(node: int, j: int) -> str:
    return f"02:99:00:00:{node:02x}:{j:02x}"


def attach_table(lab: Lab, host: str, node: int, j: int) -> dict:
    return {"name": f"c{j}", "netns": lab.add_namespace(f"{host}c{j}"), "mac": guest_mac(node, j),
            "addresses": [f"{guest_addr(node, j)}/16", f"{guest_addr(node, j, True)}/64"]}


@pytest.fixture(scope="module")
def world():
    lab = Lab(LabSpec(name=unique_name("q"), sites=(
        SiteSpec("pub", "none"), SiteSpec("easy", "easy"), SiteSpec("hard", "hard"))))
    group = None
    try:
        lab.up()
        group = LabGroup(lab, "demo", net=99, extra={"port_prediction": False})   # easy<->hard on TURN
        for host, n in HOSTS.items():
            group.add(host, index=n, attach=[attach_table(lab, host, n, j) for j in (1, 2)])
            group.start(host)
        assert wait_links(group, timeout=LINKS_TIMEOUT) is not None, "links did not all come up"
        # the third guest of every node at run time, as a user would
        for host, n in HOSTS.items():
            g = attach_table(lab, host, n, 3)
            r = cli(lab, host, "attach", "-c", str(group.nodes[host].config), "c3", "--netns", g["netns"],
                    "--mac", g["mac"], *sum((["--address", a] for a in g["addresses"]), []))
            assert r.returncode == 0, r.stderr
            assert "attached c3" in r.stdout, r.stdout
        yield lab, group
    finally:
        if group:
            group.stop_all()
        lab.down()


def in_guest(lab: Lab, host: str, j: int, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return lab.exec(f"{host}c{j}", argv, check=False, timeout=timeout)


def unreachable(lab: Lab, host: str, j: int, targets: list[str]) -> list[str]:
    """The targets a guest cannot ping (two tries each, in one shell in the guest)."""
    script = "for a in " + " ".join(targets) + "; do ping -c 1 -W 2 $a >/dev/null || " \
             "ping -c 2 -i 0.3 -W 2 $a >/dev/null || echo $a; done"
    r = in_guest(lab, host, j, ["sh", "-c", script], timeout=20 + 5 * len(targets))
    return r.stdout.split()


def all_unreachable(lab: Lab, group: LabGroup) -> dict[str, list[str]]:
    guests = [(h, n, j) for h, n in HOSTS.items() for j in (1, 2, 3)]
    bad = {}
    for host, n, j in guests:
        targets = [guest_addr(m, k) for _, m, k in guests if (m, k) != (n, j)]
        targets += [guest_addr(m, k, True) for _, m, k in guests if (m, k) != (n, j)]
        targets += [group.address(h, "demo") for h in HOSTS] + [group.address(h, "demo", v6=True) for h in HOSTS]
        miss = unreachable(lab, host, j, targets)
        if miss:
            bad[f"{host}c{j}"] = miss
    return bad


def test_every_guest_reaches_every_guest_and_node_v4_v6(world):
    lab, group = world
    # the guests attached a moment ago may need a few seconds until every neighbour
    # resolution went through (rounds of 2 tries per address); then all of them, at once
    t0 = time.monotonic()
    first = all_unreachable(lab, group)
    if first:
        until(lambda: not all_unreachable(lab, group), 60, f"every guest reachable (first round missed {first})")
    print(f"\nall 9 guests and 3 nodes reach each other (v4, v6) {time.monotonic() - t0:.1f}s after the last "
          f"attach; first round missed: {first or 'none'}")
    bad = all_unreachable(lab, group)
    assert not bad, f"guests that could not reach some addresses once converged: {bad}"
    # and the nodes reach the guests
    for host in HOSTS:
        r = lab.exec(host, ["ping", "-c", "1", "-W", "2", guest_addr(3, 3)], check=False)
        assert r.returncode == 0, (host, r.stdout)


def test_status_lists_the_guests(world):
    lab, group = world
    st = status_json(lab, group, "easyh1")
    guests = {g["name"]: g for g in st["overlays"][0]["guests"]}
    assert set(guests) == {"c1", "c2", "c3"}, guests
    n = HOSTS["easyh1"]
    for j in (1, 2, 3):
        g = guests[f"c{j}"]
        assert g["kind"] == "netns" and g["mac"] == guest_mac(n, j), g
        assert g["mtu"] == group.mtu and g["port"].startswith("ipg"), g
        assert f"{guest_addr(n, j)}/16" in g["addresses"], g
        # what the switch saw on the guest's port (the ping test before sent both ways)
        assert guest_mac(n, j) in [m.lower() for m in g["macs"]], g
        assert g["rx_frames"] > 0 and g["tx_frames"] > 0 and g["rx_bytes"] > 0, g
        assert set(g["drops"]) >= {"dhcp", "ra", "spoof", "macs_refused"}, g
    text = cli(lab, "easyh1", "status", "-c", str(group.nodes["easyh1"].config))
    assert text.returncode == 0 and "guests" in text.stdout and "c3" in text.stdout, text.stdout
    metrics = lab.exec("easyh1", [sys.executable, "-c", "import urllib.request as u; "
                                  "print(u.urlopen('http://127.0.0.1:9465/metrics', timeout=5).read().decode())"]).stdout
    assert 'ipsw_guest_frames_total{direction="rx",guest="c1",overlay="demo"}' in metrics, metrics[-2000:]
    assert 'ipsw_guest_macs{guest="c3",overlay="demo"} 1.0' in metrics


def test_bad_attach_requests_are_one_line_and_change_nothing(world):
    lab, group = world
    host, cfg = "pubh1", str(group.nodes["pubh1"].config)
    before = sorted(g["name"] for g in status_json(lab, group, host)["overlays"][0]["guests"])
    cases = {
        "no namespace": (["x1", "--netns", "ipsw-no-such-ns"], "no network namespace"),
        "no interface": (["x2", "--interface", "nosuchif0"], "no interface nosuchif0"),
        "no process": (["x3", "--pid", "999999"], "no process 999999"),
        "duplicate": (["c1", "--netns", lab.netns_of(f"{host}c1")], "already attached"),
        # a MAC the overlay already has (a guest of another node): it would steal its frames
        "MAC in use": (["x4", "--netns", lab.add_namespace(f"{host}x4"), "--mac", guest_mac(2, 1)], "already in use"),
        "two places": (["x5", "--netns", "a", "--pid", "1"], "exactly one of"),
        "bad address": (["x6", "--netns", "a", "--address", "100.99.1.1"], "prefix"),
    }
    # the other node's guest MAC must be known here first
    assert unreachable(lab, host, 1, [guest_addr(2, 1)]) == []
    for what, (args, words) in cases.items():
        r = cli(lab, host, "attach", "-c", cfg, *args)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 1 and len(lines) == 1 and words in lines[0], (what, r.stdout, r.stderr)
    after = sorted(g["name"] for g in status_json(lab, group, host)["overlays"][0]["guests"])
    assert after == before
    assert not [l for l in links(lab, host) if l.startswith("ipq")], "a half-made veth was left behind"
    assert unreachable(lab, host, 1, [guest_addr(3, 2), guest_addr(2, 3)]) == []
    r = cli(lab, host, "detach", "-c", cfg, "nosuch")
    assert r.returncode == 1 and "no guest nosuch" in r.stderr, r.stderr


def test_detach_removes_port_and_veth_and_attach_again_works(world):
    lab, group = world
    host, n, cfg = "hardh1", HOSTS["hardh1"], str(group.nodes["hardh1"].config)
    port = next(g["port"] for g in status_json(lab, group, host)["overlays"][0]["guests"] if g["name"] == "c2")
    r = cli(lab, host, "detach", "-c", cfg, "c2")
    assert r.returncode == 0, r.stderr
    assert port not in links(lab, host)
    r = in_guest(lab, host, 2, ["ip", "-o", "link"])
    assert "eth0" not in r.stdout, r.stdout                     # the guest's end went with it
    assert unreachable(lab, "pubh1", 1, [guest_addr(n, 2)]) == [guest_addr(n, 2)]
    r = cli(lab, host, "attach", "-c", cfg, "c2", "--netns", lab.netns_of(f"{host}c2"), "--mac", guest_mac(n, 2),
            "--address", f"{guest_addr(n, 2)}/16", "--address", f"{guest_addr(n, 2, True)}/64")
    assert r.returncode == 0, r.stderr
    assert until(lambda: not unreachable(lab, "pubh1", 1, [guest_addr(n, 2)]), 10, "re-attached guest reachable")


def test_attach_detach_50_times_leaks_nothing(world):
    lab, group = world
    host, cfg = "easyh1", str(group.nodes["easyh1"].config)
    ns = lab.add_namespace(f"{host}loop")
    ports_before = sorted(group_ports(lab, group, host))
    script = (f"for i in $(seq 1 50); do "
              f"{sys.executable} -m ipop_switch.cli attach -c {cfg} loop --netns {ns} --address 100.99.77.1/16 >/dev/null || exit 1; "
              f"{sys.executable} -m ipop_switch.cli detach -c {cfg} loop >/dev/null || exit 2; done")
    r = lab.exec(host, ["sh", "-c", script], check=False, timeout=240)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert sorted(group_ports(lab, group, host)) == ports_before
    assert not [l for l in links(lab, host) if l.startswith(("ipq",))]
    assert "eth0" not in lab.exec(f"{host}loop", ["ip", "-o", "link"]).stdout
    flows = json.dumps(status_json(lab, group, host)["overlays"][0]["switch"])
    assert flows                                                 # the app still answers
    assert unreachable(lab, host, 1, [guest_addr(1, 1), guest_addr(3, 1)]) == []


def group_ports(lab: Lab, group: LabGroup, host: str) -> list[str]:
    """The overlay bridge's ports, from the node's private OVS."""
    rundir = group.nodes[host].dir / "state" / "ovs"
    r = lab.exec(host, ["ovs-vsctl", f"--db=unix:{rundir}/db.sock", "list-ports", "ipswdemo"])
    return r.stdout.split()


def test_one_dhcp_server_per_overlay_rogue_bridge_offers_dropped(world):
    """A DHCP server in a guest attached with --dhcp-server serves guests on other nodes; a
    rogue one behind a Linux bridge attached as an existing interface (what a libvirt or
    Docker bridge on every host would be) is dropped at its port and counted."""
    lab, group = world
    from conftest import helper
    from helpers.wait import listening, wait_until
    pub, hard, easy = "pubh1", "hardh1", "easyh1"
    # the trusted server: a container on pubh1
    srv_ns = lab.add_namespace(f"{pub}dhcp")
    r = cli(lab, pub, "attach", "-c", str(group.nodes[pub].config), "dhcpd", "--netns", srv_ns,
            "--address", "100.99.100.1/16", "--dhcp-server")
    assert r.returncode == 0, r.stderr
    # the rogue: a Linux bridge on hardh1 with dnsmasq on it, joined to the overlay by a veth
    # whose bridge-side end is enslaved and whose other end is attached as it is
    hns = lab.netns_of(hard)
    for argv in (["ip", "link", "add", "lbr0", "type", "bridge"], ["ip", "link", "set", "lbr0", "up"],
                 ["ip", "addr", "add", "100.98.200.1/16", "dev", "lbr0"],
                 ["ip", "link", "add", "lbrup", "type", "veth", "peer", "name", "lbrdn"],
                 ["ip", "link", "set", "lbrdn", "master", "lbr0"], ["ip", "link", "set", "lbrdn", "up"]):
        lab.exec(hard, argv)
    r = cli(lab, hard, "attach", "-c", str(group.nodes[hard].config), "libvirtnet", "--interface", "lbrup")
    assert r.returncode == 0 and "attached libvirtnet (interface lbrup)" in r.stdout, (r.stdout, r.stderr)
    leases = group.dir / "leases"
    servers = [
        lab.popen(f"{pub}dhcp", ["dnsmasq", "--no-daemon", "--port=0", "--interface=eth0", "--bind-interfaces",
                                 "--dhcp-range=100.99.100.10,100.99.100.50,255.255.0.0,10m",
                                 f"--dhcp-leasefile={leases}.good", "--no-resolv", "--no-hosts"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        lab.popen(hard, ["dnsmasq", "--no-daemon", "--port=0", "--interface=lbr0", "--bind-interfaces",
                         "--dhcp-range=100.98.201.10,100.98.201.50,255.255.0.0,10m",
                         f"--dhcp-leasefile={leases}.rogue", "--no-resolv", "--no-hosts"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_until(lambda: listening(lambda argv: lab.exec(f"{pub}dhcp", argv), "udp", 67), 10, "dnsmasq")
        wait_until(lambda: listening(lambda argv: lab.exec(hard, argv), "udp", 67), 10, "rogue dnsmasq")
        # clients: a container of easyh1 with no address, and one on hardh1 (beside the rogue)
        got = {}
        for h, j in ((easy, 1), (hard, 1)):
            out = lab.exec(f"{h}c{j}", helper("dhcp_client") + ["eth0", f"02:dc:00:00:{HOSTS[h]:02x}:{j:02x}", "5"],
                           timeout=40).stdout
            got[h] = json.loads(out)
        assert all(v["ack"] and v["ack"].startswith("100.99.100.") and v["server"] == "100.99.100.1"
                   for v in got.values()), got
        def rogue_entry() -> dict:
            st = status_json(lab, group, hard)["overlays"][0]
            return next(g for g in st["guests"] if g["name"] == "libvirtnet")
        rogue = rogue_entry()
        assert rogue["kind"] == "interface" and rogue["port"] == "lbrup", rogue
        # at least one offer per client; status shows the switch's counters of a moment ago
        until(lambda: rogue_entry()["drops"]["dhcp"] >= 2, 5, "the rogue's offers counted at its port")
    finally:
        for s in servers:
            s.kill()
            s.wait(timeout=5)
        cli(lab, hard, "detach", "-c", str(group.nodes[hard].config), "libvirtnet")
        cli(lab, pub, "detach", "-c", str(group.nodes[pub].config), "dhcpd")
    # detaching an interface we do not own leaves it in place
    assert "lbrup" in links(lab, hard)


def test_mdns_from_a_guest_reaches_every_other_guest_exactly_once(world, tmp_path):
    lab, group = world
    from pathlib import Path
    from conftest import helper
    from helpers.wait import wait_until
    mcast = helper("switch_mcast")
    receivers = {}
    for host, j in (("pubh1", 2), ("easyh1", 1), ("easyh1", 3), ("hardh1", 1), ("hardh1", 3)):
        out = tmp_path / f"{host}c{j}.json"
        receivers[(host, j)] = (lab.popen(f"{host}c{j}", mcast + [
            "recv", "--iface", "eth0", "--listen", "udp4", "224.0.0.251:5353", "--out", str(out),
            "--duration", "6"]), out)
    wait_until(lambda: all(Path(str(o) + ".ready").exists() for _, o in receivers.values()), 10, "receivers ready")
    lab.exec("pubh1c1", mcast + ["send", "--iface", "eth0", "--send", "udp4", "224.0.0.251:5353",
                                 "--count", "10", "--rate", "20", "--tag", "mdns"], timeout=20)
    for key, (p, out) in receivers.items():
        p.wait(timeout=20)
        counts = json.loads(out.read_text())["udp4 224.0.0.251:5353"]
        mine = {k: v for k, v in counts.items() if k.startswith("mdns-")}
        assert len(mine) == 10 and set(mine.values()) == {1}, (key, counts)


def test_iperf3_guest_to_guest_across_the_relayed_pair(world):
    lab, group = world
    easy = status_json(lab, group, "easyh1")["overlays"][0]["peers"]
    hard_id = group.nodes["hardh1"].node_id
    assert next(p for p in easy if p["node_id"] == hard_id)["path"] == "relay"   # easy <-> hard: TURN
    server = lab.popen("hardh1c2", ["iperf3", "-s", "-1", "-B", guest_addr(3, 2)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        until(lambda: lab.exec("hardh1c2", ["ss", "-ltnH"]).stdout.count(":5201") > 0, 10, "iperf3 server")
        r = lab.exec("easyh1c2", ["iperf3", "-c", guest_addr(3, 2), "-t", "3", "-J", "--connect-timeout", "3000"],
                     check=False, timeout=40)
        mbit = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
        print(f"\niperf3 guest easyh1c2 -> hardh1c2 over the relayed link: {mbit:.0f} Mbit/s")
        assert mbit > 10, r.stdout[-1000:]
    finally:
        server.kill()
        server.wait(timeout=5)


def test_guest_moved_to_another_node_is_followed(world):
    """A container detached from one node and re-created on another with the same MAC and
    address (what a migrated VM or a re-scheduled container is): a guest of a third node
    reaches it within 1 s of the attach (whose announcement is its first frame from the new
    place), and a ping stream across the move loses only what was sent while it was away."""
    lab, group = world
    mac, ip4 = "02:99:00:00:aa:01", "100.99.200.1"
    ns = lab.add_namespace("mover")

    def attach(host: str, *extra: str) -> float:
        r = cli(lab, host, "attach", "-c", str(group.nodes[host].config), "mover", "--netns", ns, "--mac", mac,
                "--address", f"{ip4}/16", *extra)
        assert r.returncode == 0, r.stderr
        return time.monotonic()

    attach("easyh1")
    until(lambda: not unreachable(lab, "pubh1", 1, [ip4]), 15, "the guest reachable at its first node")
    stream = lab.popen("pubh1c1", ["ping", "-n", "-i", "0.05", "-w", "9", "-W", "1", ip4],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(1.5)    # the stream runs with the guest at its first node (steady state, not a wait)
        t_gone = time.monotonic()
        r = cli(lab, "easyh1", "detach", "-c", str(group.nodes["easyh1"].config), "mover")
        assert r.returncode == 0, r.stderr
        # its MAC is still known at hardh1 (behind the link to easyh1) until it speaks from there:
        # a plain attach says so and refuses; --moved says it moved
        r = cli(lab, "hardh1", "attach", "-c", str(group.nodes["hardh1"].config), "mover", "--netns", ns,
                "--mac", mac, "--address", f"{ip4}/16")
        assert r.returncode != 0 and "--moved" in r.stderr, r.stderr
        t_back = attach("hardh1", "--moved")
        r = in_guest(lab, "pubh1", 1, ["ping", "-n", "-c", "1", "-W", "1", ip4], timeout=10)
        reached = time.monotonic() - t_back
        assert r.returncode == 0, f"the moved guest not reached within 1 s of its attach at the new node: {r.stdout}"
        out = stream.communicate(timeout=20)[0]
        tx, rx = (int(x.split()[0]) for x in out.split("\n---")[1].splitlines()[1].split(", ")[:2])
        away = t_back - t_gone
        allowed = math.ceil((away + reached) / 0.05) + 3
        print(f"\nguest moved easyh1 -> hardh1: away {away * 1000:.0f} ms (detach + attach commands), "
              f"reached {reached * 1000:.0f} ms after the attach; stream lost {tx - rx} of {tx} "
              f"(at most {allowed} allowed)")
        assert tx - rx <= allowed, out[-500:]
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait()
        cli(lab, "hardh1", "detach", "-c", str(group.nodes["hardh1"].config), "mover")
