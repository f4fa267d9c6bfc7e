"""SocialVPN translation in the switch app with real OVS (userspace datapath) in namespaces,
veth pairs as the friends' links (docs/social.md).

alice (node 0) is friends with bob (1) and carol (2); bob and carol are not linked. All three
use the SAME own social address 100.80.0.1. alice sees bob at 100.80.0.2 and carol at
100.80.0.3; bob sees alice at 100.80.0.2 (the same number alice gave bob: views are local);
carol sees alice at 100.80.0.5.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from ipop_switch import proc
from ipop_switch.lab import Namespaces, destroy_lab

from helpers.switch_net import BR, SwitchNet, ping, quiet_port
from helpers.wait import listening, wait_until

pytestmark = pytest.mark.lab

OWN = "100.80.0.1"
A_SEES = {1: "100.80.0.2", 2: "100.80.0.3"}   # alice's view of bob and carol
SEES_A = {1: "100.80.0.2", 2: "100.80.0.5"}   # bob's and carol's view of alice


def _mac(nd) -> str:
    return nd.sh("cat", f"/sys/class/net/{BR}/address").stdout.strip()


@pytest.fixture(scope="module")
def social(tmp_path_factory):
    lab = f"so{os.getpid() % 100000}"[:9]
    net = None
    try:
        net = SwitchNet(lab, tmp_path_factory.mktemp("social"), 3)
        for nd in net.nodes:
            mac = _mac(nd)
            nd.ovs.vsctl("set", "bridge", BR, f"other-config:hwaddr={mac}")  # as the agent pins it
            nd.sh("ip", "addr", "add", f"{OWN}/16", "dev", BR)
            # complete checksums from the hosts: what the capture checks is then OVS's rewrite alone
            # (with offload the host hands OVS pseudo-header partial sums, not checksums)
            nd.sh("ethtool", "-K", BR, "tx", "off")
            net.run(nd.ctl.set_social(OWN, mac))
        for f in (1, 2):
            net.link(0, f, tell=False)
            a, b = net.nodes[0], net.nodes[f]
            net.run(a.ctl.add_friend_port(a.peers[f], b.nid, A_SEES[f]))
            net.run(b.ctl.add_friend_port(b.peers[0], a.nid, SEES_A[f]))
        yield net
    finally:
        if net:
            net.close()
        destroy_lab(lab)


def _counters(net, i: int) -> dict[str, int]:
    return net.run(net.nodes[i].ctl.counters())


def test_each_side_reaches_the_other_at_its_own_view(social):
    a, b, c = social.nodes
    for f in (1, 2):
        assert wait_until(lambda: ping(a, A_SEES[f], wait=1), 10, f"alice -> friend {f}")
    assert ping(b, SEES_A[1]) and ping(c, SEES_A[2])
    # the host learnt the friend's local MAC from the app's ARP answer
    assert "02:5f:64:50:00:02" in a.sh("ip", "neigh", "show", A_SEES[1]).stdout
    assert _counters(social, 0)["social_arp"] >= 1
    assert _counters(social, 1)["social_translated"] >= 1


def test_not_friends_not_reachable(social):
    a, b, c = social.nodes
    # bob has no link to carol: nothing he can name reaches her (carol's address in alice's view
    # means nothing to bob; alice's switch never forwards between friends)
    rx = lambda: int(c.sh("cat", f"/sys/class/net/{c.peers[0]}/statistics/rx_packets").stdout)
    before = rx()
    assert not ping(b, A_SEES[2], wait=1)
    assert not ping(b, "100.80.0.5", wait=1)
    assert rx() == before  # not one frame reached carol's link


def _pcap_packets(path: Path):
    from scapy.utils import rdpcap
    return list(rdpcap(str(path))) if path.exists() and path.stat().st_size > 24 else []


def test_capture_on_bob_shows_his_view_with_valid_checksums(social, tmp_path):
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import Ether

    a, b, _ = social.nodes
    pcap = tmp_path / "bob.pcap"
    cap = proc.spawn(["tcpdump", "-U", "-n", "-i", BR, "-w", str(pcap), "ip and src host", SEES_A[1]], netns=b.ns,
                     log=tmp_path / "tcpdump.log")
    srv = proc.spawn(["iperf3", "-s", "-1", "-B", OWN], netns=b.ns, log=tmp_path / "iperf3-s.log")
    try:
        wait_until(lambda: pcap.exists() and pcap.stat().st_size >= 24, 10, "tcpdump to open its capture")
        wait_until(lambda: listening(lambda argv: b.sh(*argv), "tcp", 5201), 10, "iperf3 -s listening")
        assert ping(a, A_SEES[1], count=3)
        r = a.sh("iperf3", "-c", A_SEES[1], "-n", "2M", "-J", check=False, timeout=30)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
        udp = ("import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
               f"[s.sendto(b'x' * 300, ('{A_SEES[1]}', 9999)) for _ in range(5)]")
        a.sh(sys.executable, "-c", udp)
        wait_until(lambda: {p[IP].proto for p in _pcap_packets(pcap) if IP in p} >= {1, 6, 17}, 10,
                   "ICMP, TCP and UDP from alice in bob's capture")
    finally:
        proc.terminate(cap.pid)
        proc.terminate(srv.pid)
    pkts = [p for p in _pcap_packets(pcap) if IP in p]
    bob_mac = _mac(b)
    checked = {1: 0, 6: 0, 17: 0}
    for p in pkts:
        assert (p[IP].src, p[IP].dst) == (SEES_A[1], OWN)  # bob's view, although alice sent from 100.80.0.1
        assert p[Ether].dst == bob_mac and p[Ether].src == "02:5f:64:50:00:02"
        fresh = Ether(bytes(p))
        ip = fresh[IP]
        want_ip = ip.chksum
        del ip.chksum
        l4 = ip.payload
        want_l4 = l4.chksum if isinstance(l4, (TCP, UDP, ICMP)) else None
        if want_l4 is not None:
            del l4.chksum
        rebuilt = Ether(bytes(fresh))
        assert rebuilt[IP].chksum == want_ip, "IPv4 header checksum"
        if want_l4 is not None:
            assert rebuilt[IP].payload.chksum == want_l4, f"{type(l4).__name__} checksum"
            checked[ip.proto] += 1
    assert all(checked.values()), checked
    c = _counters(social, 1)
    assert c["social_translated"] >= len(pkts)


def test_broadcast_and_non_ipv4_not_carried_but_counted(social):
    from scapy.layers.inet6 import IPv6, UDP as UDP6
    from scapy.layers.l2 import ARP, Ether

    a, b, _ = social.nodes
    port_a, port_b = a.peers[1], b.peers[0]
    rx = lambda: int(b.sh("cat", f"/sys/class/net/{port_b}/statistics/rx_packets").stdout)
    before = rx()
    # alice's host broadcasts (ARP for an address nobody has, a subnet broadcast): stay on her node
    a.sh("ping", "-b", "-c", "2", "-i", "0.2", "-W", "1", "100.80.255.255", check=False)
    a.sh("ping", "-c", "1", "-W", "1", "100.80.0.77", check=False)  # an ARP request broadcast
    assert rx() == before
    # a friend's node that sends them anyway (a hostile or broken peer): dropped at bob, counted
    dropped = _counters(social, 1)["social_dropped"]
    frames = [Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=OWN),
              Ether(dst=_mac(b)) / IPv6(dst="fd00::1") / UDP6(dport=9),
              Ether(dst="01:00:5e:00:00:fb", type=0x0800) / (b"\x45" + bytes(39))]
    send = ("import sys; from scapy.all import sendp, Ether; "
            f"[sendp(Ether(bytes.fromhex(h)), iface='{port_a}', verbose=0) for h in sys.argv[1:]]")
    a.sh(sys.executable, "-c", send, *(bytes(f).hex() for f in frames))
    wait_until(lambda: _counters(social, 1)["social_dropped"] >= dropped + 3, 10, "bob's social_dropped to count 3")


def test_friend_port_removed_then_restored(social):
    a, _, c = social.nodes
    port = a.peers[2]
    social.run(a.ctl.remove_friend_port(port))
    assert not ping(a, A_SEES[2], wait=1)
    assert social.run(a.ctl.status())["social"]["friends"].keys() == {a.peers[1]}
    social.run(a.ctl.add_friend_port(port, c.nid, A_SEES[2]))
    assert wait_until(lambda: ping(a, A_SEES[2], wait=1), 10, "carol again")


def test_address_in_use_refused(social):
    from ipop_switch.bridge.controller import SwitchAppError
    a, b, _ = social.nodes
    with pytest.raises(SwitchAppError, match="already friend port"):
        social.run(a.ctl.add_friend_port("pz", b.nid, A_SEES[2]))
    with pytest.raises(SwitchAppError, match="our own"):
        social.run(a.ctl.add_friend_port("pz", b.nid, OWN))

