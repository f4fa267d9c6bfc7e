"""Guests on the switch test harness (helpers/switch_net.py): a guest is a network namespace
with one interface ``eth0`` (fixed MAC, IPv4 and IPv6), whose veth peer is a local port of
a node's bridge, told to the app with ``add_local_port`` (what the agent's attach does)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ipop_switch import proc
from ipop_switch.lab import Namespaces

from helpers.switch_net import BR, Node, SwitchNet, quiet_port

HELPERS = Path(__file__).parent
FRAMES = [sys.executable, str(HELPERS / "guest_frames.py")]


@dataclass
class Guest:
    name: str
    ns: str
    mac: str
    ip4: str
    ip6: str
    node: Node | None = None
    port: str | None = None  # its port on node's bridge

    def sh(self, *argv: str, check: bool = True, timeout: float = 30.0):
        return proc.run(list(argv), netns=self.ns, check=check, timeout=timeout)


def new_guest(net: SwitchNet, name: str, mac: str, ip4: str, ip6: str, *, quiet: bool = False) -> Guest:
    """The guest's namespace (no interface yet). ``quiet``: IPv6 off, so the kernel sends nothing
    on its own when the interface comes up (a move test controls the guest's first frame)."""
    ns = net.nsx.add(name)
    if quiet:
        for key in ("all", "default"):
            proc.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1"], netns=ns)
    return Guest(name, ns, mac, ip4, ip6)


def plug(net: SwitchNet, g: Guest, node: Node, port: str, *, v6: bool = True, **opts) -> None:
    """A veth from the guest's eth0 to ``port`` on node's bridge, then the app told (opts:
    dhcp_trusted, allowed_macs)."""
    Namespaces.veth(g.ns, "eth0", node.ns, port, up=False)
    g.sh("ip", "link", "set", "eth0", "address", g.mac)
    g.sh("ip", "addr", "add", f"{g.ip4}/16", "dev", "eth0")
    if v6:
        g.sh("ip", "-6", "addr", "add", f"{g.ip6}/64", "dev", "eth0", "nodad")
    quiet_port(node.ns, port)
    node.sh("ip", "link", "set", port, "up")
    node.ovs.add_port(BR, port)
    net.run(node.ctl.add_local_port(port, **opts))
    g.sh("ip", "link", "set", "eth0", "up")
    g.node, g.port = node, port


def unplug(net: SwitchNet, g: Guest) -> None:
    """The agent's detach: the app told, the port and the veth removed."""
    if g.node is None:
        return
    node, port = g.node, g.port
    try:
        net.run(node.ctl.remove_local_port(port))
    except Exception:
        pass
    node.ovs.del_port(BR, port)
    node.sh("ip", "link", "del", port, check=False)
    g.node = g.port = None


def gping(g: Guest, addr: str, *, count: int = 1, wait: float = 2.0) -> bool:
    argv = ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", str(wait), addr]
    if ":" in addr:
        argv.insert(1, "-6")
    return g.sh(*argv, check=False, timeout=wait * count + 5).returncode == 0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")
