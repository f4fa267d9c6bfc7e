"""SIGHUP: read the node config again and apply what can change under a running node.

Applied live: ``node.log_level``; each overlay's ``[[overlay.attach]]`` list (a guest
removed is detached, a new one attached, a changed one detached and attached again,
through the same code as ``ipop-switch attach/detach``); its ``[overlay.dns]`` (the
responder is stopped and started with the new settings; if they fail, the old ones come
back; a new ``dns.name`` reaches the other members only with the next start, as it travels
in the signaling announce). Everything else (addresses, XMPP, ICE, OVS, new or removed
overlays, ...) needs a restart: one log line names it.
A config that does not load is refused in one line and the running node goes on as it was.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ..config import Config, ConfigError, OverlayConfig, load_config

log = logging.getLogger("ipop_switch.agent")

LIVE_NODE_FIELDS = {"log_level"}
LIVE_OVERLAY_FIELDS = {"attach", "dns"}


def plan(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(what applies live, what needs a restart) as config names without spaces
    (``node.log_level``, ``overlay[demo].attach``, ``overlay[x]:added``); pure."""
    live, restart = [], []
    for f in _node_fields(old, new):
        (live if f in LIVE_NODE_FIELDS else restart).append(f"node.{f}")
    if old.ovs != new.ovs:
        restart.append("ovs")
    olds = {o.name: o for o in old.overlay}
    news = {o.name: o for o in new.overlay}
    restart += [f"overlay[{n}]:added" for n in news if n not in olds]
    restart += [f"overlay[{n}]:removed" for n in olds if n not in news]
    for name in [n for n in news if n in olds]:
        for f in OverlayConfig.field_names():
            if getattr(olds[name], f) != getattr(news[name], f):
                (live if f in LIVE_OVERLAY_FIELDS else restart).append(f"overlay[{name}].{f}")
        if olds[name].dns.name != news[name].dns.name:
            restart.append(f"overlay[{name}].dns.name")     # announced to the others at start
    return live, restart


def _node_fields(old: Config, new: Config) -> list[str]:
    return [f for f in type(old.node).field_names() if getattr(old.node, f) != getattr(new.node, f)]


class Reloader:
    """One reload at a time (a second SIGHUP during one waits for it)."""

    def __init__(self, node, path: Path | str | None) -> None:
        self.node = node
        self.path = Path(path) if path else None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    def request(self) -> None:
        """The SIGHUP handler: start a reload on the loop."""
        t = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def reload(self) -> dict:
        async with self._lock:
            if self.path is None:
                log.warning("event=reload_refused reason=\"the agent was started without a config path\"")
                return {"ok": False}
            try:
                new = await asyncio.to_thread(load_config, self.path)
            except ConfigError as e:
                log.error("event=reload_failed error=\"%s\" (the running config stays)", e)
                return {"ok": False, "error": str(e)}
            old = self.node.cfg
            live, restart = plan(old, new)
            errors: list[str] = []
            if new.node.log_level != old.node.log_level:
                logging.getLogger().setLevel(new.node.log_level.upper())
            for ov in self.node.overlays:
                ncfg = next((o for o in new.overlay if o.name == ov.cfg.name), None)
                if ncfg is not None and ncfg.attach != ov.cfg.attach:
                    errors += await self._guests(ov, ncfg)
                if ncfg is not None and ncfg.dns != ov.cfg.dns:
                    errors += await self._dns(ov, ncfg)
            # the node keeps running on its old config but for what was applied
            self.node.cfg = old.replace(node=old.node.replace(log_level=new.node.log_level))
            log.info("event=config_reloaded path=%s applied=%s restart_needed=%s errors=%d", self.path,
                     ",".join(live) or "-", ",".join(restart) or "-", len(errors))
            if restart:
                log.warning("event=restart_needed changed=%s (not applied until the agent restarts)", ",".join(restart))
            return {"ok": not errors, "applied": live, "restart_needed": restart, "errors": errors}

    async def _dns(self, ov, ncfg: OverlayConfig) -> list[str]:
        """The responder again with the new [overlay.dns] (or none, or back to the old one
        if the new one cannot listen)."""
        from ..errors import IpopError
        from .dns import start_dns
        if ov.signaling is None:
            return [f"overlay {ov.cfg.name} is not started"]
        old_cfg = ov.cfg
        if ov.dns is not None:
            await ov.dns.stop()
            ov.dns = None
        ov.cfg = ov.cfg.replace(dns=ncfg.dns)
        try:
            ov.dns = await start_dns(ov)
            return []
        except IpopError as e:
            log.error("event=reload_dns_failed overlay=%s error=\"%s\" (the previous DNS settings stay)", ov.cfg.name, e)
            ov.cfg = old_cfg
            try:
                ov.dns = await start_dns(ov)
            except IpopError as e2:
                log.error("event=dns_down overlay=%s error=\"%s\"", ov.cfg.name, e2)
            return [f"dns: {e}"]

    async def _guests(self, ov, ncfg: OverlayConfig) -> list[str]:
        """Detach the guests gone or changed, attach every config guest not attached (new,
        changed, or one that failed before); the overlay's config then holds the new list."""
        from .guests import spec_of
        if ov.guests is None:
            log.error("event=reload_attach_failed overlay=%s error=\"the overlay is still starting: send SIGHUP "
                      "again once it is up\"", ov.cfg.name)
            return [f"overlay {ov.cfg.name} is not started"]
        old = {g.name: g for g in ov.cfg.attach}
        new = {g.name: g for g in ncfg.attach}
        errors = []
        for name, g in old.items():
            if new.get(name) != g and name in ov.guests.ports.guests:
                try:
                    await ov.guests.detach(name)
                except Exception as e:
                    errors.append(f"detach {name}: {e}")
                    log.error("event=reload_detach_failed overlay=%s guest=%s error=%s", ov.cfg.name, name, e)
        for name, g in new.items():
            if name not in ov.guests.ports.guests:      # new, changed, or failed before: (again)
                try:
                    await ov.guests.attach(spec_of(g))
                except Exception as e:
                    errors.append(f"attach {name}: {e}")
                    ov.guests.failed[name] = str(e)
                    log.error("event=reload_attach_failed overlay=%s guest=%s error=%s", ov.cfg.name, name, e)
        for name in old:
            if name not in new:
                ov.guests.failed.pop(name, None)
        ov.cfg = ov.cfg.replace(attach=list(ncfg.attach))
        return errors
