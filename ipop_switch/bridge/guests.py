"""Guests on the overlay's bridge: containers, namespaces, VMs and whole LANs plugged into
the node's OVS bridge as *local* ports, beside the bridge's own LOCAL port (IPOP's switch
mode: every guest on every node on one Ethernet segment).

Two kinds, as ``ovs-docker add-port`` and libvirt do it:

- **netns** (a namespace by name or path, or a container by PID): we make a veth pair, put
  one end into the namespace (renamed ``ifname``, with the MAC, the overlay's MTU and any
  static addresses) and add the other end to the bridge. Detaching deletes the pair.
- **interface** (a VM's TAP, a NIC, a veth into a Linux bridge): added to the bridge as it
  is, and only removed from it on detach (we do not own it).

The switch app is told separately (the agent does it): this module only touches devices
and OVS. Errors are ``GuestError`` with one line a user can act on; a failed attach leaves
nothing behind.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import proc
from ..errors import CommandError, IpopError
from .ovs import OvsInstance

NETNS_RUN_DIR = Path("/run/netns")
_IFNAME = re.compile(r"^[^/\s]{1,15}$")


class GuestError(IpopError):
    pass


@dataclass(frozen=True)
class GuestSpec:
    """What to attach (the agent builds it from ``[[overlay.attach]]`` or the CLI)."""
    name: str
    netns: str | None = None
    pid: int | None = None
    interface: str | None = None
    ifname: str = "eth0"
    mac: str | None = None
    mtu: int | None = None
    addresses: tuple[str, ...] = ()
    dhcp_server: bool = False
    lock_mac: bool = False
    moved: bool = False             # came from another node: its MAC seen elsewhere is not a conflict

    @property
    def kind(self) -> str:
        return "interface" if self.interface is not None else "netns"

    def where(self) -> str:
        """The place as the user named it."""
        if self.interface is not None:
            return f"interface {self.interface}"
        return f"pid {self.pid}" if self.pid is not None else f"netns {self.netns}"


@dataclass
class Guest:
    spec: GuestSpec
    port: str                       # the bridge port (our veth end, or the interface itself)
    mac: str | None                 # the guest's MAC where we set it (netns), else None
    mtu: int | None
    ns_path: str | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        s = self.spec
        return {"name": s.name, "kind": s.kind, "where": s.where(), "port": self.port, "mac": self.mac,
                "mtu": self.mtu, "addresses": list(s.addresses), "dhcp_server": s.dhcp_server,
                "lock_mac": s.lock_mac, "notes": list(self.notes)}


def port_name(overlay: str, guest: str) -> str:
    """<= 15 chars, unique per (overlay, guest) on this node; 'ipg' marks our guest ports."""
    h = hashlib.sha256(f"{overlay}/{guest}".encode()).hexdigest()[:9]
    return f"ipg{overlay[:3]}{h}"


def random_mac() -> str:
    b = bytearray(random.randbytes(6))
    b[0] = (b[0] & 0xFC) | 0x02          # locally administered, unicast
    return ":".join(f"{x:02x}" for x in b)


def ns_path(spec: GuestSpec) -> str:
    """The namespace file of a netns guest; raises GuestError if there is none."""
    if spec.pid is not None:
        path = f"/proc/{spec.pid}/ns/net"
        if not os.path.exists(path):
            raise GuestError(f"guest {spec.name}: no process {spec.pid} (is the container running?)")
        return path
    assert spec.netns is not None
    path = spec.netns if "/" in spec.netns else str(NETNS_RUN_DIR / spec.netns)
    if not os.path.exists(path):
        raise GuestError(f"guest {spec.name}: no network namespace {spec.netns!r} ({path} does not exist)")
    return path


class GuestPorts:
    """The guests of one overlay bridge. ``netns`` is where the bridge lives (the agent's
    namespace; None: ours)."""

    def __init__(self, ovs: OvsInstance, bridge: str, overlay: str, *, mtu: int,
                 netns: str | None = None) -> None:
        self.ovs = ovs
        self.bridge = bridge
        self.overlay = overlay
        self.mtu = mtu
        self.netns = netns
        self.guests: dict[str, Guest] = {}

    # -- attach -------------------------------------------------------------------------
    def attach(self, spec: GuestSpec, *, macs_in_use: dict[str, str] | None = None) -> Guest:
        """Plug ``spec`` in. ``macs_in_use``: MAC -> where it is seen on the overlay (a guest
        with a MAC already there would steal its frames: refused)."""
        if spec.name in self.guests:
            raise GuestError(f"guest {spec.name} is already attached to overlay {self.overlay} "
                             f"({self.guests[spec.name].spec.where()})")
        mac = (spec.mac or "").lower() or None
        if mac:
            owner = (macs_in_use or {}).get(mac) or next(
                (f"guest {g.spec.name}" for g in self.guests.values() if g.mac == mac), None)
            if owner:
                raise GuestError(f"guest {spec.name}: MAC {mac} is already in use on overlay {self.overlay} ({owner}); "
                                 f"if the guest moved here from another node, attach it with --moved (moved = true)")
        guest = self._attach_netns(spec, mac) if spec.kind == "netns" else self._attach_interface(spec)
        self.guests[spec.name] = guest
        return guest

    def _attach_interface(self, spec: GuestSpec) -> Guest:
        dev = spec.interface
        assert dev is not None
        if dev == self.bridge or dev.startswith(("ipt", "ipg")):
            raise GuestError(f"guest {spec.name}: {dev} is one of the overlay's own interfaces")
        info = self._link(dev)
        if info is None:
            raise GuestError(f"guest {spec.name}: no interface {dev} on this host")
        if " master " in info:
            master = info.split(" master ", 1)[1].split()[0]
            raise GuestError(f"guest {spec.name}: {dev} is already a port of {master} "
                             f"(attach the bridge through a veth instead, see docs/guests.md)")
        if any(dev in self.ovs.ports(b) for b in self.ovs.bridges()):
            raise GuestError(f"guest {spec.name}: {dev} is already a port of an OVS bridge")
        mtu = _mtu_of(info)
        notes = []
        if mtu and mtu > self.mtu:
            notes.append(f"MTU {mtu} is larger than the overlay's {self.mtu}: only TCP is covered "
                         f"(MSS clamp); lower it on the guests for other traffic")
        try:
            self._ip("link", "set", dev, "up")
            self.ovs.add_port(self.bridge, dev)
        except (CommandError, IpopError) as e:
            self.ovs.del_port(self.bridge, dev)
            raise GuestError(f"guest {spec.name}: cannot add {dev} to the bridge: {e}") from None
        return Guest(spec, dev, None, mtu, notes=notes)

    def _attach_netns(self, spec: GuestSpec, mac: str | None) -> Guest:
        path = ns_path(spec)
        if not _IFNAME.match(spec.ifname):
            raise GuestError(f"guest {spec.name}: bad interface name {spec.ifname!r}")
        if self._inside(path, "ip", "link", "show", "dev", spec.ifname, check=False).returncode == 0:
            raise GuestError(f"guest {spec.name}: the namespace already has an interface {spec.ifname}")
        port = port_name(self.overlay, spec.name)
        peer = "ipq" + port[3:]
        mac = mac or random_mac()
        mtu = spec.mtu or self.mtu
        if self._link(port) is not None:          # a leftover of a crashed agent: ours to remove
            self._ip("link", "del", port, check=False)
        try:
            self._ip("link", "add", port, "mtu", str(mtu), "type", "veth", "peer", "name", peer, "mtu", str(mtu))
            self._ip("link", "set", peer, "netns", path)
            self._inside(path, "ip", "link", "set", peer, "name", spec.ifname)
            self._inside(path, "ip", "link", "set", spec.ifname, "address", mac)
            for a in spec.addresses:
                if ipaddress.ip_interface(a).version == 6:
                    self._inside(path, "sysctl", "-q", "-w", f"net.ipv6.conf.{spec.ifname}.disable_ipv6=0", check=False)
                    self._inside(path, "ip", "-6", "addr", "add", a, "dev", spec.ifname, "nodad")
                else:
                    self._inside(path, "ip", "addr", "add", a, "dev", spec.ifname)
            self._inside(path, "ip", "link", "set", spec.ifname, "up")
            self._inside(path, "ip", "link", "set", "lo", "up", check=False)
            # our end is a switch port, not a host interface: no IPv6 of its own (it would send
            # router solicitations and MLD reports to the guest from a MAC nobody knows)
            proc.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{port}.disable_ipv6=1"], netns=self.netns, check=False)
            self._ip("link", "set", port, "up")
            self.ovs.add_port(self.bridge, port)
        except (CommandError, IpopError) as e:
            self.ovs.del_port(self.bridge, port)
            self._ip("link", "del", port, check=False)
            self._inside(path, "ip", "link", "del", peer, check=False)
            self._inside(path, "ip", "link", "del", spec.ifname, check=False)
            raise GuestError(f"guest {spec.name}: {_one_line(e)}") from None
        return Guest(spec, port, mac, mtu, ns_path=path)

    # -- detach -------------------------------------------------------------------------
    def detach(self, name: str) -> Guest:
        g = self.guests.pop(name, None)
        if g is None:
            known = ", ".join(sorted(self.guests)) or "none"
            raise GuestError(f"no guest {name} on overlay {self.overlay} (attached: {known})")
        self.ovs.del_port(self.bridge, g.port)
        if g.spec.kind == "netns":
            self._ip("link", "del", g.port, check=False)   # and its peer inside the namespace
        return g

    def detach_all(self) -> None:
        for name in list(self.guests):
            try:
                self.detach(name)
            except IpopError:
                pass

    # -- helpers --------------------------------------------------------------------------
    def _ip(self, *args: str, check: bool = True):
        return proc.run(["ip", *args], netns=self.netns, check=check)

    def _inside(self, path: str, *argv: str, check: bool = True):
        return proc.run(["nsenter", f"--net={path}", *argv], check=check)

    def _link(self, dev: str) -> str | None:
        r = self._ip("-o", "link", "show", "dev", dev, check=False)
        return r.stdout if r.returncode == 0 else None


def _mtu_of(info: str) -> int | None:
    m = re.search(r" mtu (\d+)", info)
    return int(m.group(1)) if m else None


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
