"""SocialVPN end to end in the lab (docs/social.md): real agents (ipop-switch up), the lab's
Prosody with ordinary accounts, friendships made through the CLI (real subscriptions).

alice has two devices (laptop on a public host, phone behind an easy NAT), bob is on a public
host, carol behind a hard NAT (alice's phone reaches her over the TURN relay: port prediction,
which would find a direct path between easy and hard, is off on that pair). alice is friends
with bob and with carol; bob and carol are not friends. Every node uses the SAME own address
100.80.0.1: each reaches its friends at addresses it assigned itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import helper, unique_name
from helpers.wait import wait_until
from ipop_switch import proc
from ipop_switch.config import dns_loopback
from ipop_switch.config_writer import write_config
from ipop_switch.identity import GroupCA, NodeIdentity
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.lab import services
from ipop_switch.status_client import query

pytestmark = [pytest.mark.lab, pytest.mark.slow]

OVERLAY = "soc"
OWN = "100.80.0.1"
DOMAIN = services.XMPP_DOMAIN
# node -> (host, user, device name)
NODES = {"laptop": ("pubh1", "alice", "laptop"), "phone": ("easyh1", "alice", "phone"),
         "bob": ("pubh2", "bob", "desk"), "carol": ("hardh1", "carol", "pc")}
LINK_TIMEOUT = 60.0
GROUP, GROUP_NET = "grp", "100.81.0"   # a GroupVPN of alice's laptop and bob beside the SocialVPN
GROUP_NODES = {"laptop": 1, "bob": 2}


class SocialNode:
    def __init__(self, lab: Lab, root: Path, key: str, password: str, ca: GroupCA) -> None:
        self.lab, self.key, self.password, self.ca = lab, key, password, ca
        self.host, self.user, self.device = NODES[key]
        self.jid = f"{self.user}@{DOMAIN}"
        self.dir = root / key
        self.proc = None
        self.group = GROUP_NODES.get(key)
        turn = lab.services()["turn"]
        self.new_identity()
        xmpp = {"server": services.XMPP_ADDR, "jid": self.jid, "password": password, "ca_file": lab.ca_cert}
        ice = {"stun": f"{services.TURN_ADDR}:{services.TURN_PORT}", "turn": f"{services.TURN_ADDR}:{services.TURN_PORT}",
               "turn_user": turn["user"], "turn_password": turn["password"]}
        if key in ("phone", "carol"):   # the hard-NAT friend stays on the relay (docs/nat.md: no prediction)
            ice = {**ice, "port_prediction": False}
        overlays = [{"name": OVERLAY, "kind": "social", "address": f"{OWN}/16", "mtu": 1400, "xmpp": xmpp,
                     "ice": ice, "social": {"node": self.device}, "dns": {"enable": True}}]
        if self.group:   # the same account in a group's room: both modes at once, each on its bridge
            overlays.append({"name": GROUP, "address": f"{GROUP_NET}.{self.group}/16", "mtu": 1400, "xmpp": xmpp,
                             "ice": ice})
        write_config(self.config, {
            "node": {"identity_dir": self.dir / "identity", "state_dir": self.dir / "state", "metrics": "",
                     "worker_processes": 1},
            "ovs": {"mode": "private"},
            "overlay": overlays,
        }, header="written by test_social_lab")

    def new_identity(self) -> None:
        """A new key (and, for a group member, its group certificate issued again)."""
        ident = NodeIdentity.create(self.dir / "identity", name=self.device, force=True)
        if self.group:
            ident.install(self.ca.bundle(self.ca.issue(ident.request())))

    @property
    def config(self) -> Path:
        return self.dir / "node.toml"

    @property
    def sock(self) -> Path:
        return self.dir / "state" / "agent.sock"

    def start(self) -> None:
        self.proc = proc.spawn([sys.executable, "-m", "ipop_switch.cli", "up", "-c", str(self.config),
                                "--pidfile", str(self.dir / "agent.pid")],
                               netns=self.lab.netns_of(self.host), log=self.dir / "agent.log")
        wait_until(lambda: self.sock.exists() and self.online(), 30, f"{self.key}'s agent online",
                   retry_on=(Exception,))

    def stop(self) -> None:
        if self.proc is not None:
            proc.terminate(self.proc.pid, grace=15)
            self.proc = None

    def status(self) -> dict:
        return query(self.sock)

    def overlay(self, name: str = OVERLAY) -> dict:
        return next(o for o in self.status()["overlays"] if o["name"] == name)

    def online(self) -> bool:
        return self.overlay()["signaling"]["state"] == "online"

    def friends(self, *args: str, check: bool = True) -> str:
        r = self.lab.exec(self.host, [sys.executable, "-m", "ipop_switch.cli", "friends", "--socket", str(self.sock),
                                      *args], check=False, timeout=60)
        if check:
            assert r.returncode == 0, f"{self.key}: friends {' '.join(args)}: {r.stdout}{r.stderr}"
        return r.stdout

    def social(self) -> dict:
        return json.loads(self.friends("list", "--json"))

    def node_of(self, other: "SocialNode") -> dict | None:
        return self.social()["friends"].get(other.jid, {}).get("nodes", {}).get(other.device)

    def addr_of(self, other: "SocialNode") -> str:
        return self.node_of(other)["address"]

    def state_of(self, other: "SocialNode") -> str | None:
        n = self.node_of(other)
        return n["state"] if n else None

    def ping(self, addr: str, count: int = 2, wait: float = 2) -> bool:
        return self.lab.exec(self.host, ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", str(wait), addr],
                             check=False, timeout=30).returncode == 0


def befriend(a: SocialNode, b: SocialNode) -> None:
    a.friends("add", b.jid)
    wait_until(lambda: b.social()["friends"].get(a.jid, {}).get("requested"), 20, f"{b.key} to see {a.key}'s request")
    b.friends("accept", a.jid)
    wait_until(lambda: a.social()["friends"].get(b.jid, {}).get("subscription") == "both", 20,
               f"{a.key} and {b.key} to be friends")


def linked(a: SocialNode, b: SocialNode, timeout: float = LINK_TIMEOUT) -> None:
    wait_until(lambda: a.state_of(b) == "linked" and b.state_of(a) == "linked", timeout,
               f"{a.key} <-> {b.key} linked", interval=0.5, retry_on=(Exception,))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("social")
    lab = Lab(LabSpec(name=unique_name("s"), sites=(SiteSpec("pub", "none", hosts=2), SiteSpec("easy", "easy"),
                                                    SiteSpec("hard", "hard"))))
    nodes: dict[str, SocialNode] = {}
    try:
        lab.up()
        passwords = {u: lab.add_account(u) for u in ("alice", "bob", "carol")}
        ca = GroupCA.create(root / "ca", GROUP)
        for key in NODES:
            nodes[key] = SocialNode(lab, root, key, passwords[NODES[key][1]], ca)
        for n in nodes.values():
            n.start()
        befriend(nodes["laptop"], nodes["bob"])
        befriend(nodes["laptop"], nodes["carol"])
        yield lab, nodes
    finally:
        for n in nodes.values():
            n.stop()
        for n in nodes.values():
            log = n.dir / "agent.log"
            if log.exists():
                print(f"---- {n.key} agent.log (tail)\n" + "\n".join(log.read_text().splitlines()[-40:]),
                      file=sys.stderr)
        lab.down()


def test_friends_reach_each_other_at_their_own_views(world):
    lab, n = world
    laptop, phone, bob, carol = n["laptop"], n["phone"], n["bob"], n["carol"]
    for a, b in ((laptop, bob), (laptop, carol), (phone, bob), (phone, carol), (laptop, phone)):
        linked(a, b)
    for a, b in ((laptop, bob), (laptop, carol), (phone, bob), (phone, carol), (bob, laptop), (carol, phone)):
        addr = a.addr_of(b)
        assert addr != OWN and addr.startswith("100.80.")
        assert wait_until(lambda: a.ping(addr, count=1), 10, f"{a.key} -> {b.key} at {addr}")
    # the relay carries the hard-NAT friend's link to the easy-NAT phone (both ends see it so;
    # the pings above went over it both ways)
    assert phone.social()["friends"][carol.jid]["nodes"][carol.device]["path"] == "relay"
    assert carol.social()["friends"][phone.jid]["nodes"][phone.device]["path"] == "relay"
    # bob and carol are not friends: nothing of one is known to the other
    assert carol.jid not in bob.social()["friends"] and bob.jid not in carol.social()["friends"]


def _valid_checksums(pkts) -> dict[int, int]:
    """IPv4 packets whose IPv4 and ICMP/TCP/UDP checksums are right, by protocol; asserts each."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import Ether
    ok = {1: 0, 6: 0, 17: 0}
    for p in pkts:
        fresh = Ether(bytes(p))
        ip = fresh[IP]
        want_ip, l4 = ip.chksum, ip.payload
        want_l4 = l4.chksum if isinstance(l4, (TCP, UDP, ICMP)) else None
        del ip.chksum
        if want_l4 is not None:
            del l4.chksum
        again = Ether(bytes(fresh))
        assert again[IP].chksum == want_ip, f"IPv4 header checksum of {p.summary()}"
        if want_l4 is not None:
            assert again[IP].payload.chksum == want_l4, f"{type(l4).__name__} checksum of {p.summary()}"
            ok[ip.proto] += 1
    return ok


def test_tcp_udp_and_a_capture_in_bobs_view_with_valid_checksums(world, tmp_path):
    from scapy.layers.inet import IP
    from scapy.utils import rdpcap
    lab, n = world
    laptop, bob = n["laptop"], n["bob"]
    linked(laptop, bob)
    to_bob, to_laptop = laptop.addr_of(bob), bob.addr_of(laptop)
    # complete checksums from alice's host (no offload): what the capture checks is the rewrite
    lab.exec(laptop.host, ["ethtool", "-K", "ipswsoc", "tx", "off"])
    pcap = tmp_path / "bob.pcap"
    cap = lab.popen(bob.host, ["tcpdump", "-U", "-n", "-i", "ipswsoc", "-w", str(pcap), "ip and src host", to_laptop],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    srv = lab.popen(bob.host, ["iperf3", "-s", "-B", OWN], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: pcap.exists() and pcap.stat().st_size >= 24, 10, "tcpdump on bob's bridge")
        time.sleep(0.5)
        assert laptop.ping(to_bob, count=3)
        tcp = json.loads(lab.exec(laptop.host, ["iperf3", "-c", to_bob, "-t", "3", "-J", "--connect-timeout", "3000"],
                                  check=False, timeout=40).stdout)
        udp = json.loads(lab.exec(laptop.host, ["iperf3", "-c", to_bob, "-u", "-b", "50M", "-t", "2", "-J",
                                                "--connect-timeout", "3000"], check=False, timeout=40).stdout)
        mbps = tcp["end"]["sum_received"]["bits_per_second"] / 1e6
        udp_rx = udp["end"]["sum"]["packets"] - udp["end"]["sum"]["lost_packets"]
        assert mbps > 10, tcp["end"]
        assert udp_rx > 1000, udp["end"]["sum"]
        print(f"\nsocial TCP laptop -> bob: {mbps:.0f} Mbit/s; UDP 50M: {udp_rx} datagrams received, "
              f"{udp['end']['sum']['lost_percent']:.2f} % lost", file=sys.stderr)
    finally:
        for p in (srv, cap):
            p.terminate()
            p.wait(timeout=10)
        lab.exec(laptop.host, ["ethtool", "-K", "ipswsoc", "tx", "on"], check=False)
    every = [p for p in rdpcap(str(pcap)) if IP in p]
    pkts = [p for proto in (1, 6, 17) for p in [q for q in every if q[IP].proto == proto][:1000]]
    assert pkts, "nothing of alice's in bob's capture"
    for p in pkts:   # bob's view: alice at the address bob gave her, to bob's own address
        assert (p[IP].src, p[IP].dst) == (to_laptop, OWN), p.summary()
    ok = _valid_checksums(pkts)
    assert ok[1] and ok[6] and ok[17], ok


def test_removed_friend_is_cut_within_5s_and_back_when_added(world):
    lab, n = world
    laptop, carol = n["laptop"], n["carol"]
    linked(laptop, carol)
    carol_id = laptop.node_of(carol)["node_id"]
    t0 = time.monotonic()
    laptop.friends("remove", carol.jid)
    wait_until(lambda: carol_id not in {p["node_id"] for p in laptop.overlay()["peers"]}, 5,
               "alice's link to carol to go", interval=0.2)
    took = time.monotonic() - t0
    addr = laptop.addr_of(carol) if laptop.node_of(carol) else None
    time.sleep(5)
    assert carol_id not in {p["node_id"] for p in laptop.overlay()["peers"]}, "came back by itself"
    assert carol.jid not in {j for j, f in laptop.social()["friends"].items() if f["subscription"] == "both"}
    print(f"\nsocial: link to a removed friend gone {took:.2f} s after 'friends remove'", file=sys.stderr)
    befriend(laptop, carol)
    linked(laptop, carol)
    again = laptop.addr_of(carol)
    assert addr is None or again == addr   # her address is kept
    assert wait_until(lambda: laptop.ping(again, count=1), 10, "carol again")


def test_reinitialised_friend_refused_until_forgotten(world):
    lab, n = world
    laptop, phone, bob = n["laptop"], n["phone"], n["bob"]
    linked(laptop, bob)
    addr, old = laptop.addr_of(bob), laptop.node_of(bob)
    bob.stop()
    bob.new_identity()                             # a new key, same account and name
    bob.start()
    refused = lambda: (laptop.node_of(bob) or {}).get("refused") and laptop.state_of(bob) == "refused"
    wait_until(refused, 30, "alice's laptop to refuse bob's new key", interval=0.5)
    node = laptop.node_of(bob)
    assert node["fingerprint"] == old["fingerprint"] and node["refused"]["fingerprint"] != old["fingerprint"]
    assert node["refused"]["count"] >= 1
    assert "key_changed" in laptop.social()["drops"]
    assert not laptop.ping(addr, count=1, wait=1)
    log = (laptop.dir / "agent.log").read_text()
    assert "event=friend_key_refused" in log and "friends forget" in log
    time.sleep(3)
    assert laptop.state_of(bob) == "refused"      # nothing silently re-pinned
    for dev in (laptop, phone):
        assert "forgot" in dev.friends("forget", bob.jid, bob.device)
    linked(laptop, bob)
    node = laptop.node_of(bob)
    assert node["fingerprint"] != old["fingerprint"] and node["refused"] is None
    assert laptop.addr_of(bob) == addr             # same friend node, same address
    assert wait_until(lambda: laptop.ping(addr, count=1), 10, "bob again")


def ask(lab: Lab, host: str, name: str, server: str = dns_loopback(OVERLAY)) -> dict:
    r = lab.exec(host, [*helper("dns_ask"), server, "53", name, "A"], check=False, timeout=20)
    assert r.returncode == 0, f"dns_ask on {host} {name}: {r.stdout}{r.stderr}"
    return json.loads(r.stdout)


def test_hosts_and_verify(world):
    lab, n = world
    laptop, bob = n["laptop"], n["bob"]
    linked(laptop, bob)
    lines = laptop.friends("hosts").splitlines()
    assert f"{laptop.addr_of(bob)}\t{bob.device}.bob.ipsw.internal" in lines
    # the node's DNS responder serves the same names, each node its own view
    for line in lines:
        addr, name = line.split("\t")
        assert ask(lab, laptop.host, name)["answers"] == [{"type": "A", "data": addr}], name
    assert ask(lab, laptop.host, "laptop.alice.ipsw.internal")["answers"] == [{"type": "A", "data": OWN}]
    assert ask(lab, bob.host, "laptop.alice.ipsw.internal")["answers"] == [{"type": "A", "data": bob.addr_of(laptop)}]
    assert ask(lab, bob.host, "pc.carol.ipsw.internal")["rcode"] == "NXDOMAIN"    # not bob's friend
    r = lab.exec(laptop.host, [*helper("dns_ask"), OWN, "53", "desk.bob.ipsw.internal"], check=False, timeout=20)
    assert r.returncode != 0, "a social responder answered on the overlay address (friends would see our friends)"
    assert laptop.overlay()["dns"]["answers"] >= len(lines) + 1
    fp = laptop.node_of(bob)["fingerprint"]
    # bob reads his own fingerprint out to alice (his own certificate)
    own = bob.status()["overlays"][0]
    r = lab.exec(laptop.host, [sys.executable, "-m", "ipop_switch.cli", "friends", "--socket", str(laptop.sock),
                               "verify", bob.jid, "00" * 32], check=False)
    assert r.returncode != 0 and "no node of" in (r.stdout + r.stderr)
    assert "verified" in laptop.friends("verify", bob.jid, fp)
    assert laptop.node_of(bob)["verified"]
    assert own["social"]["node"] == bob.device


def test_strangers_are_counted_and_change_nothing(world, tmp_path):
    """A stranger's presence with our element, announce, unsolicited 'subscribed' and roster push."""
    lab, n = world
    laptop, bob, carol = n["laptop"], n["bob"], n["carol"]
    linked(laptop, bob)
    before_links = {p["node_id"] for p in bob.overlay()["peers"]}
    before = bob.social()
    conf = tmp_path / "intruder.json"
    conf.write_text(json.dumps({"jid": carol.jid, "password": carol.password, "server": services.XMPP_ADDR,
                                "ca": str(lab.ca_cert), "target_jid": f"{bob.jid}/{bob.device}", "overlay": OVERLAY,
                                "claims": bob.node_of(laptop)["node_id"]}))
    r = lab.exec(carol.host, [*helper("social_intruder"), str(conf)], check=False, timeout=60)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"sent": 4}, r.stdout + r.stderr

    def counted() -> bool:
        drops, sig = bob.social()["drops"], bob.overlay()["signaling"]["drops"]
        return (drops.get("not_friend", 0) > before["drops"].get("not_friend", 0) and sig.get("foreign_source", 0) >= 1
                and drops.get("foreign_roster_push", 0) > before["drops"].get("foreign_roster_push", 0))
    wait_until(counted, 10, "bob to count the stranger's presence and message", retry_on=(Exception,))
    after = bob.social()
    assert after["friends"].get(carol.jid, {}).get("subscription", "none") != "both"
    assert {p["node_id"] for p in bob.overlay()["peers"]} == before_links
    assert bob.state_of(laptop) == "linked"


def test_group_and_social_on_the_same_nodes_are_isolated(world, tmp_path):
    from scapy.layers.inet import IP
    from scapy.layers.l2 import ARP
    from scapy.utils import rdpcap
    lab, n = world
    laptop, bob = n["laptop"], n["bob"]
    linked(laptop, bob)
    bob_grp = f"{GROUP_NET}.{GROUP_NODES['bob']}"
    wait_until(lambda: any(p["state"] == "up" for p in laptop.overlay(GROUP)["peers"]), LINK_TIMEOUT,
               "the group's link laptop <-> bob", interval=0.5, retry_on=(Exception,))
    assert wait_until(lambda: laptop.ping(bob_grp, count=1), 10, "bob in the group")   # the group works too
    to_bob = laptop.addr_of(bob)
    caps = {}
    for br in ("ipswsoc", "ipswgrp"):
        caps[br] = (lab.popen(bob.host, ["tcpdump", "-U", "-n", "-i", br, "-w", str(tmp_path / f"{br}.pcap")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), tmp_path / f"{br}.pcap")
    try:
        wait_until(lambda: all(p.exists() and p.stat().st_size >= 24 for _, p in caps.values()), 10, "tcpdumps")
        time.sleep(0.5)
        # group traffic: a broadcast, ARP for an address nobody has, a ping; social traffic: a ping
        lab.exec(laptop.host, ["ping", "-b", "-c", "3", "-i", "0.2", "-W", "1", "-I", "ipswgrp", f"{GROUP_NET[:-2]}.255.255"],
                 check=False)
        lab.exec(laptop.host, ["ping", "-c", "1", "-W", "1", f"{GROUP_NET}.99"], check=False)
        assert laptop.ping(bob_grp, count=3)
        assert laptop.ping(to_bob, count=3)
        # across: bob's social address in alice's view is not reachable through the group's bridge
        r = lab.exec(laptop.host, ["ping", "-c", "2", "-W", "1", "-I", "ipswgrp", to_bob], check=False)
        assert r.returncode != 0, "a social address answered through the group"
        time.sleep(1)
    finally:
        for p, _ in caps.values():
            p.terminate()
            p.wait(timeout=10)
    soc = [p for p in rdpcap(str(caps["ipswsoc"][1]))]
    grp = [p for p in rdpcap(str(caps["ipswgrp"][1]))]
    assert any(IP in p and p[IP].src == bob.addr_of(laptop) for p in soc), "the social ping did not arrive"
    assert any(IP in p and p[IP].src.startswith(GROUP_NET) for p in grp), "the group's traffic did not arrive"
    leaked = [p.summary() for p in soc if (IP in p and (p[IP].src.startswith("100.81.") or p[IP].dst.startswith("100.81.")))
              or (ARP in p and (p[ARP].pdst.startswith("100.81.") or p[ARP].psrc.startswith("100.81.")))]
    assert not leaked, leaked[:5]
    # (alice's host asking the group's bridge for 100.80.0.x by ARP is the group's own traffic: no one answers)
    leaked = [p.summary() for p in grp if IP in p and (p[IP].src.startswith("100.80.") or p[IP].dst.startswith("100.80."))]
    assert not leaked, leaked[:5]
