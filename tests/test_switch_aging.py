"""MAC aging in the switch app (docs/switch.md, "Learning, aging, moves"): a learned MAC
stays learned while its station talks, and is forgotten on every node (the app's table
and the flows in OVS) once the station has been silent for the aging time.

Two nodes of the switch harness (real OVS, the real app with a 3 s aging), a veth as the
tunnel; a station in its own namespace on a local port of node 0 with static neighbour
entries and IPv6 off, so it sends nothing but the pings the test asks for."""

from __future__ import annotations

import time

import pytest

from conftest import unique_name
from helpers.switch_net import BR, SwitchNet, quiet_port
from ipop_switch import proc
from ipop_switch.lab import Namespaces, destroy_lab

pytestmark = pytest.mark.lab

AGING = 3
STATION_MAC = "02:5a:00:00:00:01"
STATION_IP = "100.96.0.100"


@pytest.fixture
def net(tmp_path):
    name = unique_name("sa")
    sn = None
    try:
        sn = SwitchNet(name, tmp_path, 2, aging=AGING)
        sn.link(0, 1)
        sn.tell_topology()
        yield sn
    finally:
        if sn:
            sn.close()
        destroy_lab(name)


def _station(net: SwitchNet) -> str:
    """A host behind a local port ``vh`` of node 0."""
    n0, n1 = net.nodes
    st = net.nsx.add("st")
    Namespaces.veth(n0.ns, "vh", st, "eth0")
    quiet_port(n0.ns, "vh")
    n0.ovs.add_port(BR, "vh")
    net.run(n0.ctl.add_local_port("vh"))
    n1_mac = n1.sh("cat", f"/sys/class/net/{BR}/address").stdout.strip()
    for argv in (["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"],
                 ["ip", "link", "set", "eth0", "address", STATION_MAC],
                 ["ip", "addr", "add", f"{STATION_IP}/16", "dev", "eth0"],
                 ["ip", "link", "set", "eth0", "up"],
                 ["ip", "neigh", "replace", n1.ip4, "lladdr", n1_mac, "dev", "eth0", "nud", "permanent"]):
        proc.run(argv, netns=st)
    n1.sh("ip", "neigh", "replace", STATION_IP, "lladdr", STATION_MAC, "dev", BR, "nud", "permanent")
    return st


def _ping(st: str, addr: str, count: int, interval: float) -> bool:
    return proc.run(["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "2", addr], netns=st,
                    check=False, timeout=count * interval + 10).returncode == 0


def _learned(net: SwitchNet) -> list[tuple[bool, bool]]:
    """Per node: (the station's MAC is in the app's table, OVS holds a flow naming it)."""
    return [(STATION_MAC in net.run(nd.ctl.macs()), STATION_MAC in nd.ovs.ofctl("dump-flows", BR))
            for nd in net.nodes]


def _wait(net: SwitchNet, want: bool, timeout: float, what: str) -> float:
    """Seconds until every node's app and OVS agree with ``want``; fail after ``timeout``."""
    t0 = time.monotonic()
    while True:
        seen = _learned(net)
        if all(x == (want, want) for x in seen):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"{what}: (app, OVS) per node {seen} after {timeout:g} s"
        time.sleep(0.1)


def test_silent_mac_is_forgotten_after_aging(net):
    st = _station(net)
    assert _ping(st, net.nodes[1].ip4, 2, 0.2)
    _wait(net, True, 2.0, "the station's MAC learned on both nodes")
    # talking keeps it: pings every 0.5 s for twice the aging time
    assert _ping(st, net.nodes[1].ip4, 4 * AGING, 0.5)
    assert _learned(net) == [(True, True)] * 2, "a MAC that keeps talking was forgotten (aging not idle-based?)"
    # silence: gone everywhere (app and OVS) within the aging time plus OVS's expiry granularity, not before
    took = _wait(net, False, AGING + 10, "the silent MAC forgotten")
    print(f"\nMAC forgotten {took:.1f} s after its station went silent (aging {AGING} s)")
    assert took >= AGING - 0.5, took
    # and it is learned again as soon as it speaks
    assert _ping(st, net.nodes[1].ip4, 2, 0.2)
    _wait(net, True, 2.0, "the MAC learned again")
