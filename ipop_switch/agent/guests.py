"""One overlay's guests, joined to its switch app: the device and OVS work of
``bridge/guests.py`` (run in a thread: a few ``ip`` calls must not stall the loop), then the
app told the port is local (with its DHCP trust and MAC lock), and the reverse on detach.
Links are never touched: attaching at run time is a new local port, nothing more."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..bridge.controller import SwitchController
from ..bridge.guests import Guest, GuestError, GuestPorts, GuestSpec
from ..config import AttachConfig

log = logging.getLogger("ipop_switch.agent")


def spec_of(cfg: AttachConfig | dict) -> GuestSpec:
    """A GuestSpec from the config (or from the CLI's request, validated the same way)."""
    c = cfg if isinstance(cfg, AttachConfig) else AttachConfig.model_validate(cfg)
    return GuestSpec(name=c.name, netns=c.netns, pid=c.pid, interface=c.interface, ifname=c.ifname,
                     mac=c.mac, mtu=c.mtu, addresses=tuple(c.addresses), dhcp_server=c.dhcp_server,
                     lock_mac=c.lock_mac)


class OverlayGuests:
    def __init__(self, ports: GuestPorts, switch: SwitchController, overlay: str) -> None:
        self.ports = ports
        self.switch = switch
        self.overlay = overlay
        self.failed: dict[str, str] = {}      # config guests that could not be attached at start
        self._lock = asyncio.Lock()           # one attach/detach at a time

    async def attach(self, spec: GuestSpec) -> Guest:
        async with self._lock:
            in_use = await self._macs_in_use() if spec.mac else {}
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
        for g in self.ports.guests.values():
            d = g.describe()
            p = ports.get(g.port) or {}
            for k in ("macs", "rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "drops"):
                if k in p:
                    d[k] = p[k]
            out.append(d)
        out += [{"name": n, "kind": "?", "error": err} for n, err in self.failed.items()]
        return out
