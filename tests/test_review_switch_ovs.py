"""Security review findings 3 and 5 with real OVS (userspace datapath) and the switch app:
two nodes in namespaces linked by a veth (tests/helpers/switch_net.py).

3: the OpenFlow controller is a unix socket in a private directory, not a TCP port; a
foreign switch (a second OVS bridge, or a raw OpenFlow client) is refused and the real
bridge keeps working. 5: a burst of random source MACs leaves the MAC table within its
caps (counted refusals), the flow table bounded, known stations reachable; OVS rate-limits
packet-ins (counted drops).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from ipop_switch.lab import destroy_lab

from helpers.switch_net import BR, SwitchNet, ping, quiet_port, wait_ping
from test_review_switch import fake_switch

pytestmark = pytest.mark.lab
HELPERS = Path(__file__).parent / "helpers"
MAX_MACS, MAX_PER_PORT = 300, 200  # small caps: a burst exceeds them whatever OVS's rate limit lets through


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    lab = f"rs{os.getpid() % 100000}"
    net = None
    try:
        net = SwitchNet(lab, tmp_path_factory.mktemp("pair"), 2)
        net.link(0, 1)
        net.tell_topology()
        for nd in net.nodes:  # restart with small caps (also: a restart over the unix socket replays state)
            nd.ctl.max_macs, nd.ctl.max_macs_per_port = MAX_MACS, MAX_PER_PORT
            net.run(nd.ctl.restart())
        wait_ping(net.nodes[0], net.nodes[1].ip4)
        yield net
    finally:
        if net:
            net.close()
        destroy_lab(lab)


def _app_pid(nd) -> int:
    return nd.ctl._proc.pid


def test_controller_is_a_private_unix_socket(pair):
    nd = pair.nodes[0]
    target = nd.ovs.vsctl("get-controller", BR).strip()
    assert target == f"unix:{nd.ctl.ofp_path}", target
    assert nd.ctl.sock_dir.stat().st_mode & 0o777 == 0o700
    for path in (nd.ctl.ofp_path, nd.ctl.sock_path):
        assert path.stat().st_mode & 0o777 == 0o600
    # the app listens on no TCP port at all (it used to be 127.0.0.1:6653)
    out = nd.sh("ss", "-ltnpH").stdout
    assert f"pid={_app_pid(nd)}," not in out, out
    # another local user cannot even reach the socket
    assert _connect_as(65534, nd.ctl.ofp_path) == "denied"
    assert _connect_as(65534, nd.ctl.sock_path) == "denied"


def _connect_as(uid: int, path: Path) -> str:
    """Try to connect to a unix socket as another user (a forked child drops root first)."""
    pid = os.fork()
    if pid == 0:  # child: no pytest, no exceptions past here
        code = 3
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(path))
                code = 0
            except PermissionError:
                code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "connected", 1: "denied"}.get(os.waitstatus_to_exitcode(status), "error")


def test_foreign_openflow_client_is_refused_and_the_bridge_keeps_working(pair):
    a, b = pair.nodes
    dpid = pair.run(a.ctl.status())["dpid"]
    before = pair.run(a.ctl.counters())["datapaths_refused"]
    flows_before = len(pair.dump_flows(0))
    assert fake_switch(str(a.ctl.ofp_path), dpid ^ 0x5A5A)  # closed by the app
    assert pair.run(a.ctl.counters())["datapaths_refused"] == before + 1
    st = pair.run(a.ctl.status())
    assert st["connected"] and st["dpid"] == dpid
    assert len(pair.dump_flows(0)) == flows_before  # the foreign switch changed nothing
    assert ping(a, b.ip4, count=3) and ping(b, a.ip4)


def test_second_bridge_pointed_at_the_controller_is_refused(pair):
    a, b = pair.nodes
    before = pair.run(a.ctl.counters())["datapaths_refused"]
    a.ovs.add_bridge("br9", fail_mode="secure")
    try:
        a.ovs.vsctl("set", "bridge", "br9", "protocols=OpenFlow13")
        a.ovs.vsctl("set-controller", "br9", f"unix:{a.ctl.ofp_path}")
        _wait(lambda: pair.run(a.ctl.counters())["datapaths_refused"] > before, 15, "br9 to be refused")
        assert pair.run(a.ctl.status())["dpid"] == a.ctl.dpid
        assert a.ovs.ofctl("dump-flows", "br9").count("cookie=") == 0  # the app installed nothing there
        assert ping(a, b.ip4, count=3)
    finally:
        a.ovs.vsctl("--if-exists", "del-br", "br9")


def _host_port(nd, name: str) -> str:
    """A veth into the bridge as a local port; returns the sending end's name."""
    tx = f"{name}x"
    nd.sh("ip", "link", "add", tx, "type", "veth", "peer", "name", name)
    for dev in (tx, name):
        nd.sh("ip", "link", "set", dev, "up")
        quiet_port(nd.ns, dev)
    nd.ovs.add_port(BR, name)
    return tx


def _burst(nd, iface: str, count: int, rate: float = 0) -> int:
    r = nd.sh(sys.executable, str(HELPERS / "mac_burst.py"), "--iface", iface, "--count", str(count),
              "--rate", str(rate), timeout=120)
    return int(r.stdout)


def _settled(net, i: int, key: str = "packet_in", quiet: float = 1.0, timeout: float = 60):
    """Counters once ``key`` has not moved for ``quiet`` seconds (the app has drained its queue)."""
    last, since, deadline = None, time.monotonic(), time.monotonic() + timeout
    while True:
        c = net.run(net.nodes[i].ctl.counters())
        if c[key] != last:
            last, since = c[key], time.monotonic()
        elif time.monotonic() - since >= quiet:
            return c
        assert time.monotonic() < deadline, f"node {i}'s {key} still moving after {timeout}s"
        time.sleep(0.2)


def test_random_source_macs_stay_within_the_caps(pair):
    a, b = pair.nodes
    ports = []
    try:
        for name in ("hb1", "hc1"):
            ports.append(name)
            tx = _host_port(a, name)
            pair.run(a.ctl.add_local_port(name))
            sent = _burst(a, tx, 5000, rate=2000)  # broadcasts: both nodes see every source
            assert sent == 5000
        for i in (0, 1):
            c = _settled(pair, i)
            macs = pair.run(pair.nodes[i].ctl.macs())
            per_port = Counter(m["port"] for m in macs.values())
            print(f"\nnode {i}: {len(macs)} MACs learned (per port {dict(per_port)}), {c['macs_refused']} refused, "
                  f"{c['packet_in']} packet-ins, {c['flows_active']} flows")
            assert len(macs) <= MAX_MACS and max(per_port.values()) <= MAX_PER_PORT
            assert c["macs_learned"] == len(macs) and c["macs_refused"] > 0
            # flows: a pointer and at most a marker or two per MAC, plus the base pipeline
            assert len(pair.dump_flows(i)) <= 3 * MAX_MACS + 100
        assert len(pair.run(a.ctl.macs())) == MAX_MACS  # node 0 saw both ports: the total cap bites
        # known stations keep working both ways
        assert ping(a, b.ip4, count=3) and ping(b, a.ip4, count=3) and ping(a, b.ip6, count=2)
    finally:
        for name in ports:
            try:
                pair.run(a.ctl.remove_local_port(name))
            except Exception:
                pass
            a.ovs.del_port(BR, name)
            a.sh("ip", "link", "del", name, check=False)


def test_ovs_rate_limits_packet_ins(pair):
    """Unpaced, a burst overruns the per-port packet-in queue: OVS drops (counted), the app
    sees fewer packet-ins than frames sent."""
    a = pair.nodes[0]
    tx = _host_port(a, "hd1")
    try:
        pair.run(a.ctl.add_local_port("hd1"))
        c0 = _settled(pair, 0)
        sent = _burst(a, tx, 5000)
        c1 = _wait(lambda: (c := pair.run(a.ctl.counters()))["packet_in_dropped"] > c0["packet_in_dropped"] and c,
                   20, "OVS to report dropped packet-ins")
        c1 = _settled(pair, 0)
        handled = c1["packet_in"] - c0["packet_in"]
        print(f"\n{sent} frames sent at once: {handled} packet-ins reached the app, "
              f"{c1['packet_in_dropped'] - c0['packet_in_dropped']} dropped by OVS's rate limit")
        assert handled < sent
    finally:
        try:
            pair.run(a.ctl.remove_local_port("hd1"))
        except Exception:
            pass
        a.ovs.del_port(BR, "hd1")
        a.sh("ip", "link", "del", "hd1", check=False)
