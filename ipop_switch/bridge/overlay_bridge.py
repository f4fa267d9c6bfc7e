"""The overlay's OVS bridge on a node: created with a stable MAC, its LOCAL port
carrying the node's overlay addresses, peer ports added and removed as links come and go.

The LOCAL port's MAC is derived from the node id and overlay name, so a restarted
node keeps its MAC and its peers' ARP/ND caches stay right.
"""

from __future__ import annotations

import hashlib

from .. import proc
from .ovs import OvsInstance


def stable_mac(node_id: str, overlay: str) -> str:
    """A locally administered unicast MAC derived from node id and overlay."""
    h = bytearray(hashlib.sha256(f"{node_id}/{overlay}".encode()).digest()[:6])
    h[0] = (h[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in h)


class OverlayBridge:
    def __init__(self, ovs: OvsInstance, name: str, *, netns: str | None = None) -> None:
        self.ovs = ovs
        self.name = name
        self.netns = netns

    def _ip(self, *args: str, check: bool = True):
        return proc.run(["ip", *args], netns=self.netns, check=check)

    def create(self, *, mac: str, mtu: int, address: str, address6: str | None = None) -> None:
        """Bridge (fail_mode secure: nothing forwards until the OpenFlow app says so) and LOCAL port."""
        self.ovs.add_bridge(self.name, fail_mode="secure")
        self.ovs.vsctl("set", "bridge", self.name, f"other-config:hwaddr={mac}")
        self._ip("link", "set", self.name, "address", mac)
        self._ip("link", "set", self.name, "mtu", str(mtu))
        self._ip("addr", "replace", address, "dev", self.name)
        if address6:
            proc.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{self.name}.disable_ipv6=0"], netns=self.netns, check=False)
            self._ip("-6", "addr", "replace", address6, "dev", self.name, "nodad")
        self._ip("link", "set", self.name, "up")

    def add_peer_port(self, port: str) -> int:
        return self.ovs.add_port(self.name, port)

    def remove_peer_port(self, port: str) -> None:
        self.ovs.del_port(self.name, port)

    def destroy(self) -> None:
        self.ovs.del_bridge(self.name)
