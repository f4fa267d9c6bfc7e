"""The overlay's OVS bridge on a node: created with a stable MAC, its LOCAL port
carrying the node's overlay addresses, peer ports added and removed as links come and go.

The LOCAL port's MAC is derived from the node id and overlay name, so a restarted
node keeps its MAC and its peers' ARP/ND caches stay right.
"""

from __future__ import annotations

import hashlib
import json
import logging

from .. import proc
from .ovs import OvsInstance

log = logging.getLogger("ipop_switch.bridge")

OWN_PREFIXES = ("ipt", "ipg")   # our link TAPs and guest veths: never taken for others' ports
DHCP_SERVER_KEY = "ipop-switch-dhcp-server"   # external-ids key: "true" = a DHCP-trusted guest port


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
        self._drop_stale_ports()
        self.ovs.vsctl("set", "bridge", self.name, f"other-config:hwaddr={mac}")
        self._ip("link", "set", self.name, "address", mac)
        self._ip("link", "set", self.name, "mtu", str(mtu))
        self._ip("addr", "replace", address, "dev", self.name)
        if address6:
            proc.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{self.name}.disable_ipv6=0"], netns=self.netns, check=False)
            self._ip("-6", "addr", "replace", address6, "dev", self.name, "nodad")
        self._ip("link", "set", self.name, "up")

    def _drop_stale_ports(self) -> None:
        """A bridge that exists already was left by an agent that crashed (the system's OVS
        outlives us): its link TAPs and guest veths are gone or orphaned, so their ports go;
        ports others plugged in (a VM's) stay and become guests again."""
        stale = [p for p in self.ovs.ports(self.name) if p.startswith(OWN_PREFIXES)]
        for port in stale:
            self.ovs.del_port(self.name, port)
            if port.startswith("ipg"):     # our veth end: the pair goes with it
                self._ip("link", "del", port, check=False)
        if stale:
            log.warning("event=bridge_taken_over bridge=%s stale_ports=%s (a previous agent died)",
                        self.name, ",".join(stale))

    def foreign_ports(self) -> dict[str, dict]:
        """Ports of the bridge that others plugged in (libvirt, a user's ovs-vsctl): name ->
        {mac, iface_id, vm, mtu, dhcp_server} from the interface's external-ids and columns.
        Our own (link TAPs, guest veths) are left out by their names."""
        ports = [p for p in self.ovs.ports(self.name) if not p.startswith(OWN_PREFIXES)]
        if not ports:
            return {}
        out = self.ovs.vsctl("--format=json", "--columns=name,external_ids,mtu", "list", "Interface")
        rows = {r[0]: r for r in json.loads(out).get("data", []) if isinstance(r[0], str)}
        found: dict[str, dict] = {}
        for port in ports:
            row = rows.get(port)
            ext = dict(row[1][1]) if row and isinstance(row[1], list) and row[1][0] == "map" else {}
            mtu = row[2] if row and isinstance(row[2], int) else None
            found[port] = {"mac": ext.get("attached-mac"), "iface_id": ext.get("iface-id"),
                           "vm": ext.get("vm-id") or ext.get("vm-uuid"), "mtu": mtu,
                           "dhcp_server": ext.get(DHCP_SERVER_KEY, "").lower() == "true"}
        return found

    def add_peer_port(self, port: str) -> int:
        return self.ovs.add_port(self.name, port)

    def remove_peer_port(self, port: str) -> None:
        self.ovs.del_port(self.name, port)

    def destroy(self) -> None:
        self.ovs.del_bridge(self.name)
