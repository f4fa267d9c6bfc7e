"""One overlay's guests, joined to its switch app: the device and OVS work of
``bridge/guests.py`` (run in a thread: a few ``ip`` calls must not stall the loop), then the
app told the port is local (with its DHCP trust and MAC lock), and the reverse on detach.
Links are never touched: attaching at run time is a new local port, nothing more.

With the system's Open vSwitch, ports others plug into the bridge (libvirt's
``<virtualport type='openvswitch'/>``, a user's ``ovs-vsctl add-port``) are guests too
(kind ``ovs-port``): ``sync_ovs_ports`` makes them local ports of the switch app as they come
and go (DHCP-untrusted unless their interface says otherwise)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from ..bridge.controller import SwitchController
from ..bridge.guests import Guest, GuestError, GuestPorts, GuestSpec
from ..config import AttachConfig

log = logging.getLogger("ipop_switch.agent")


def spec_of(cfg: AttachConfig | dict) -> GuestSpec:
    """A GuestSpec from the config (or from the CLI's request, validated the same way)."""
    c = cfg if isinstance(cfg, AttachConfig) else AttachConfig.parse(cfg)
    return GuestSpec(name=c.name, netns=c.netns, pid=c.pid, interface=c.interface, ifname=c.ifname,
                     mac=c.mac, mtu=c.mtu, addresses=tuple(c.addresses), dhcp_server=c.dhcp_server,
                     lock_mac=c.lock_mac, moved=c.moved)


class OverlayGuests:
    def __init__(self, ports: GuestPorts, switch: SwitchController, overlay: str) -> None:
        self.ports = ports
        self.switch = switch
        self.overlay = overlay
        self.failed: dict[str, str] = {}      # config guests that could not be attached at start
        self.ovs_ports: dict[str, dict] = {}  # ports others plugged into the bridge: name -> what OVS says
        self._lock = asyncio.Lock()           # one attach/detach at a time

    async def attach(self, spec: GuestSpec) -> Guest:
        async with self._lock:
            # a guest that moved here is still known at its old place until it speaks from here
            # (then every node re-points to it): only this node's own guests conflict
            in_use = await self._macs_in_use() if spec.mac and not spec.moved else {}
            guest = await asyncio.to_thread(self.ports.attach, spec, macs_in_use=in_use)
            try:
                await self._tell_switch(guest)
            except Exception as e:
                await asyncio.to_thread(self.ports.detach, spec.name)
                raise GuestError(f"guest {spec.name}: the switch app refused the port ({e})") from None
            self.failed.pop(spec.name, None)
            log.info("event=guest_attached overlay=%s guest=%s %s port=%s mac=%s", self.overlay, spec.name,
                     spec.where(), guest.port, guest.mac or "-")
            return guest

    async def detach(self, name: str) -> Guest:
        async with self._lock:
            g = self.ports.guests.get(name)
            if g is None:
                return await asyncio.to_thread(self.ports.detach, name)   # raises the clear error
            try:
                await self.switch.remove_local_port(g.port)      # its markers, MACs and flows go
            except Exception as e:
                log.warning("event=guest_detach_switch_failed overlay=%s guest=%s error=%s", self.overlay, name, e)
            g = await asyncio.to_thread(self.ports.detach, name)
            log.info("event=guest_detached overlay=%s guest=%s port=%s", self.overlay, name, g.port)
            return g

    async def attach_configured(self, configs: list[AttachConfig]) -> None:
        """The config's guests at start. One that cannot be attached (a container not running
        yet) is logged and shown in status; the overlay still starts."""
        for c in configs:
            try:
                await self.attach(spec_of(c))
            except GuestError as e:
                self.failed[c.name] = str(e)
                log.error("event=guest_attach_failed overlay=%s %s", self.overlay, e)

    async def stop(self) -> None:
        for name in list(self.ports.guests):
            try:
                await self.detach(name)
            except Exception as e:
                log.warning("event=guest_detach_failed overlay=%s guest=%s error=%s", self.overlay, name, e)

    async def sync_ovs_ports(self, read: Callable[[], dict[str, dict]]) -> None:
        """Make the bridge's foreign ports (``read()``: OverlayBridge.foreign_ports, run in a
        thread) the switch app's local ports, and forget the ones gone. Under the attach/detach
        lock, so a port being attached or detached here is never taken for a foreign one."""
        async with self._lock:
            found = await asyncio.to_thread(read)
            mine = {g.port for g in self.ports.guests.values()}
            found = {n: i for n, i in found.items() if n not in mine}
            for name in [n for n in self.ovs_ports if n not in found]:
                self.ovs_ports.pop(name)
                if name in mine:
                    continue          # attached by name since (ipop-switch attach --interface): its guest now
                try:
                    await self.switch.remove_local_port(name)
                except Exception as e:
                    log.warning("event=guest_detach_switch_failed overlay=%s port=%s error=%s", self.overlay, name, e)
                log.info("event=ovs_port_gone overlay=%s port=%s", self.overlay, name)
            for name, info in found.items():
                if self.ovs_ports.get(name) == info:
                    continue
                await self.switch.add_local_port(name, dhcp_trusted=info["dhcp_server"])
                self.ovs_ports[name] = info
                log.info("event=ovs_port_guest overlay=%s port=%s iface_id=%s mac=%s dhcp_server=%s", self.overlay,
                         name, info.get("iface_id") or "-", info.get("mac") or "-", info["dhcp_server"])

    def _ovs_port_entry(self, name: str, info: dict) -> dict:
        where = "OVS port" + "".join(f", {k} {info[k]}" for k in ("iface_id", "vm") if info.get(k))
        notes = []
        if info.get("mtu") and self.ports.mtu and info["mtu"] > self.ports.mtu:
            notes.append(f"MTU {info['mtu']} is larger than the overlay's {self.ports.mtu}: TCP is clamped; "
                         "lower the guest's MTU for other traffic")
        return {"name": name, "kind": "ovs-port", "where": where, "port": name, "mac": info.get("mac"),
                "mtu": info.get("mtu"), "addresses": [], "dhcp_server": info["dhcp_server"], "lock_mac": False,
                "notes": notes}

    async def _tell_switch(self, g: Guest) -> None:
        kw: dict[str, Any] = {}
        if g.spec.dhcp_server:
            kw["dhcp_trusted"] = True
        if g.spec.lock_mac and g.mac:
            kw["allowed_macs"] = [g.mac]
        await self.switch.add_local_port(g.port, **kw)

    async def _macs_in_use(self) -> dict[str, str]:
        try:
            macs = await self.switch.macs()
        except Exception:
            return {}
        return {m.lower(): f"learned behind port {e.get('port')}, node {e.get('owner') or '?'}" for m, e in macs.items()}

    def snapshot(self, ports: dict[str, dict] | None = None) -> list[dict]:
        """Each guest with what the switch saw on its port (``ports``: SwitchController.ports())."""
        ports = ports or {}
        out = []
        entries = [(g.port, g.describe()) for g in self.ports.guests.values()]
        entries += [(n, self._ovs_port_entry(n, i)) for n, i in sorted(self.ovs_ports.items())]
        for port, d in entries:
            p = ports.get(port) or {}
            for k in ("macs", "rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "drops"):
                if k in p:
                    d[k] = p[k]
            out.append(d)
        out += [{"name": n, "kind": "?", "error": err} for n, err in self.failed.items()]
        return out
