"""Test harness for the switch app: overlay nodes as network namespaces, each with a
private OVS (userspace datapath), bridge br0 (fail_mode secure) whose LOCAL port holds
the node's overlay addresses, and the switch app; veth pairs stand in for tunnels.

Everything is made inside namespaces of one scratch lab name; ``close()`` stops the
apps and the OVS instances (the fixture removes the namespaces).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ipop_switch import proc
from ipop_switch.bridge.controller import SwitchController
from ipop_switch.bridge.ovs import OvsInstance
from ipop_switch.lab import Namespaces

BR = "br0"
PEER_MTU = 1400  # what the "tunnel" carries; hosts keep 1500 (the MSS clamp makes up the difference)


def node_id(i: int) -> str:
    # ids whose order differs from the build order, so the id ring is not the chain/ring itself
    return f"{(i * 0x9E3779B97F4A7C15) & (2**128 - 1):032x}"


@dataclass
class Node:
    i: int
    ns: str
    ovs: OvsInstance
    ctl: SwitchController
    nid: str
    ip4: str
    ip6: str
    peers: dict[int, str] = field(default_factory=dict)  # neighbour index -> port name

    def sh(self, *argv: str, check: bool = True, timeout: float = 30.0):
        return proc.run(list(argv), netns=self.ns, check=check, timeout=timeout)


class SwitchNet:
    def __init__(self, lab: str, tmp: Path, n: int, *, mtu: int = PEER_MTU, aging: int = 300) -> None:
        self.loop = asyncio.new_event_loop()
        self.nsx = Namespaces(lab)
        self.tmp, self.mtu = tmp, mtu
        self.nodes: list[Node] = []
        self.edges: list[tuple[int, int]] = []
        try:
            for i in range(n):
                ns = self.nsx.add(f"n{i}")
                ovs = OvsInstance(tmp / f"ovs{i}", netns=ns).start()
                ovs.add_bridge(BR, fail_mode="secure")
                ovs.vsctl("set", "interface", BR, "mtu_request=1500")
                ctl = SwitchController(ovs, BR, aging=aging, mtu=mtu)
                node = Node(i, ns, ovs, ctl, node_id(i + 1), f"100.96.0.{i + 1}", f"fd00:96::{i + 1}")
                self.nodes.append(node)
                node.sh("ip", "addr", "add", f"{node.ip4}/16", "dev", BR)
                node.sh("sysctl", "-q", "-w", f"net.ipv6.conf.{BR}.disable_ipv6=0")
                node.sh("ip", "-6", "addr", "add", f"{node.ip6}/64", "dev", BR, "nodad")
                node.sh("ip", "link", "set", BR, "up")
            # the apps start in parallel: os-ken start-up is most of a node's bring-up time
            self.run(_gather(*(nd.ctl.start() for nd in self.nodes)))
            self.run(_gather(*(nd.ctl.set_node_id(nd.nid) for nd in self.nodes)))
        except BaseException:
            self.close()
            raise

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    # -- links -------------------------------------------------------------
    def link(self, a: int, b: int, *, tell: bool = True) -> None:
        """A veth between nodes a and b, added to both bridges as peer ports."""
        na, nb = self.nodes[a], self.nodes[b]
        pa, pb = f"p{b}", f"p{a}"
        Namespaces.veth(na.ns, pa, nb.ns, pb, mtu=self.mtu)
        for nd, port in ((na, pa), (nb, pb)):
            quiet_port(nd.ns, port)
            nd.ovs.add_port(BR, port)
        na.peers[b], nb.peers[a] = pa, pb
        self.edges.append((a, b))
        if tell:
            self.run(_gather(na.ctl.add_peer_port(pa, nb.nid), nb.ctl.add_peer_port(pb, na.nid)))

    def unlink(self, a: int, b: int) -> None:
        na, nb = self.nodes[a], self.nodes[b]
        pa, pb = na.peers.pop(b), nb.peers.pop(a)
        self.run(_gather(na.ctl.remove_peer_port(pa), nb.ctl.remove_peer_port(pb)))
        na.ovs.del_port(BR, pa)
        nb.ovs.del_port(BR, pb)
        na.sh("ip", "link", "del", pa, check=False)
        self.edges = [e for e in self.edges if set(e) != {a, b}]

    def tell_topology(self) -> None:
        edges = [(self.nodes[a].nid, self.nodes[b].nid) for a, b in self.edges]
        self.run(_gather(*(nd.ctl.set_topology(edges) for nd in self.nodes)))

    # -- observation ----------------------------------------------------------
    def counters(self) -> list[dict[str, int]]:
        return self.run(_gather(*(nd.ctl.counters() for nd in self.nodes)))

    def peer_rx(self) -> int:
        """Frames received on all peer ports of all nodes (kernel counters of the veths)."""
        total = 0
        for nd in self.nodes:
            for port in nd.peers.values():
                total += int(nd.sh("cat", f"/sys/class/net/{port}/statistics/rx_packets").stdout)
        return total

    def dump_flows(self, i: int) -> list[tuple[int, int, int]]:
        """(cookie, table, priority) of every flow in node i's bridge, from ovs-ofctl."""
        out = self.nodes[i].ovs.ofctl("dump-flows", BR)
        flows = []
        for line in out.splitlines():
            line = line.strip()
            if not line.startswith("cookie="):
                continue
            kv = dict(part.split("=", 1) for part in line.replace(",", " ").split() if "=" in part)
            flows.append((int(kv["cookie"], 16), int(kv.get("table", "0")), int(kv.get("priority", "32768"))))
        return flows

    def close(self) -> None:
        for nd in self.nodes:
            try:
                self.run(nd.ctl.stop())
            except Exception:
                pass
            nd.ovs.stop()
        self.loop.close()


async def _gather(*coros):
    return await asyncio.gather(*coros)


def quiet_port(ns: str, port: str) -> None:
    """Keep the host stack off a peer port: no addresses, no ARP answers, no IPv6."""
    for key, val in ((f"net.ipv6.conf.{port}.disable_ipv6", "1"), (f"net.ipv4.conf.{port}.arp_ignore", "8"),
                     (f"net.ipv4.conf.{port}.arp_announce", "2")):
        proc.run(["sysctl", "-q", "-w", f"{key}={val}"], netns=ns)


def ping(node: Node, addr: str, *, count: int = 1, wait: float = 2.0, iface: str | None = None) -> bool:
    argv = ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", str(wait)]
    if ":" in addr:
        argv.insert(1, "-6")
    if iface:
        argv += ["-I", iface]
    return node.sh(*argv, addr, check=False, timeout=wait * count + 5).returncode == 0


def wait_ping(node: Node, addr: str, *, timeout: float = 10.0) -> float:
    """Seconds until addr answers; raises AssertionError after timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ping(node, addr, wait=0.5):
            return time.monotonic() - t0
    raise AssertionError(f"{addr} unreachable from node {node.i} after {timeout}s")


def link_local(node: Node, timeout: float = 5.0) -> str:
    """The bridge's fe80:: address once duplicate address detection has finished."""
    t0 = time.monotonic()
    while True:
        out = json.loads(node.sh("ip", "-j", "-6", "addr", "show", "dev", BR, "scope", "link").stdout)
        for a in (a for i in out for a in i.get("addr_info", [])):
            if a.get("local", "").startswith("fe80") and not a.get("tentative"):
                return a["local"]
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"node {node.i} has no usable link-local address: {out}")
        time.sleep(0.1)
