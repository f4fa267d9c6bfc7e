"""One node: the OVS instance, the worker pool, one Overlay per configured overlay,
the status socket and the metrics exporter; clean shutdown on SIGTERM/SIGINT.

The only place (with ``overlay.py``) that joins identity, signaling, workers and
the bridge.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

from .. import proc
from ..bridge.ovs import OvsInstance, default_datapath, host_buffer_note
from ..tunnel import accel
from ..config import Config
from ..errors import IpopError
from ..netwatch import AddressWatch
from .reload import Reloader
from .status import StatusServer

log = logging.getLogger("ipop_switch.agent")


class Node:
    def __init__(self, cfg: Config, *, netns: str | None = None, config_path: Path | str | None = None) -> None:
        self.cfg = cfg
        self.netns = netns
        self.started = time.monotonic()
        self.ovs: OvsInstance | None = None
        self.switch_log_dir: Path | None = None  # where the switch apps' logs go (None: the OVS's run directory)
        self.overlays: list = []
        self.pool = None
        self.notes: list[str] = []
        self.status_server = StatusServer(cfg.status_socket, self._async_snapshot, self._control)
        self._stop = asyncio.Event()
        self.fatal = ""                  # set by fail(): the node ends with this error
        self._metrics = None
        self.web = None                  # the overlay view ([node.web], ipop_switch/web/)
        self._tasks: list[asyncio.Task] = []
        self.node_id = "?"
        self.watch = AddressWatch()     # the host's address changes, for signaling (links watch their own)
        self.reloader = Reloader(self, config_path)     # SIGHUP: apply what can change live (agent/reload.py)

    # -- lifecycle --------------------------------------------------------------------
    async def run(self) -> None:
        """Start everything, wait for a signal, stop everything (also when a start step fails)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reloader.request)
        try:
            await self.start()
            log.info("event=node_up node=%s overlays=%s", self.node_id, ",".join(o.cfg.name for o in self.overlays))
            await self._stop.wait()
            if self.fatal:
                raise IpopError(self.fatal)
        finally:
            await self.stop()

    def request_stop(self) -> None:
        self._stop.set()

    def fail(self, message: str) -> None:
        """Stop the node with an error (one line, non-zero exit): a part found it cannot work."""
        self.fatal = self.fatal or message
        self._stop.set()

    async def start(self) -> None:
        self.cfg.node.state_dir.mkdir(parents=True, exist_ok=True)
        await self.status_server.start()
        if self.cfg.node.web.enable:     # a bad or busy port fails here, before anything else starts
            from ..web.server import WebServer
            from .summaries import WebSource
            self.web = WebServer(self.cfg.node.web.addr(), WebSource(self)).bind()
        self._start_ovs()
        if self.cfg.node.metrics:
            self._start_metrics()
        await self._start_pool()
        await self._start_overlays()
        if self.web is not None:
            await self.web.start()
        if self.watch.start():
            self.watch.subscribe(self._addresses_changed)

    def _addresses_changed(self) -> None:
        for ov in self.overlays:
            if ov.signaling is not None:
                ov.signaling.local_addresses_changed()

    def _start_ovs(self) -> None:
        mode = self.cfg.ovs.mode
        if mode == "system":
            # the running OVS is used, never started or stopped; our logs stay out of its run directory
            self.ovs = OvsInstance.attach(self.cfg.ovs.db_socket, netns=self.netns, datapath=self.cfg.ovs.datapath)
            self.switch_log_dir = self.cfg.node.state_dir
            note = host_buffer_note(self.ovs.datapath)
            if note:
                self.notes.append(note)
            return
        datapath = default_datapath() if self.cfg.ovs.datapath == "auto" else self.cfg.ovs.datapath
        note = host_buffer_note(datapath)
        if note:
            self.notes.append(note)
        rundir = self.cfg.ovs.rundir or (self.cfg.node.state_dir / "ovs")
        stale = kill_stale(rundir)
        if stale:
            log.warning("event=stale_processes_stopped count=%d rundir=%s (a previous agent died)", stale, rundir)
        self.ovs = OvsInstance(rundir, netns=self.netns, datapath=datapath, die_with_parent=True).start()

    def _start_metrics(self) -> None:
        from .metrics import start_metrics
        loop = asyncio.get_running_loop()

        def snapshot_threadsafe() -> dict:
            return asyncio.run_coroutine_threadsafe(self._async_snapshot(), loop).result(timeout=5)
        try:
            self._metrics = start_metrics(self.cfg.node.metrics, snapshot_threadsafe)
        except OSError as e:
            raise IpopError(f"node.metrics: cannot listen on {self.cfg.node.metrics}: {e.strerror}") from None

    async def _start_pool(self) -> None:
        from ..tunnel.pool import WorkerPool
        # default: one per core but one (OVS's userspace datapath and the kernel need a core too;
        # on 2 cores this also keeps the node within its memory budget)
        n = self.cfg.node.worker_processes or max(1, (os.cpu_count() or 1) - 1)
        self.pool = await WorkerPool(n, log_dir=self.cfg.node.state_dir).start()
        self._tasks.append(asyncio.create_task(self._pool_events(), name="pool-events"))

    async def _pool_events(self) -> None:
        """Route each worker event to its overlay (link ids are '<overlay>:<peer>')."""
        async for e in self.pool.events():
            name = e.link_id.split(":", 1)[0] if e.link_id else ""
            for ov in self.overlays:
                if ov.cfg.name == name or (not name and e.kind == "pool_restart"):
                    try:
                        await ov.on_pool_event(e)
                    except Exception:
                        log.exception("event=pool_event_failed kind=%s link=%s", e.kind, e.link_id)

    async def _start_overlays(self) -> None:
        from .overlay import Overlay
        for i, ocfg in enumerate(self.cfg.overlay):
            ov = Overlay(ocfg, self, index=i)
            self.overlays.append(ov)
            await ov.start()

    async def stop(self) -> None:
        self.watch.stop()
        for t in self._tasks:
            t.cancel()
        if self.web is not None:
            await self.web.stop()
        for ov in reversed(self.overlays):
            try:
                await asyncio.wait_for(ov.stop(), 15)
            except Exception as e:  # keep going: the rest must still be cleaned up
                log.error("event=overlay_stop_failed overlay=%s error=%s", ov.cfg.name, e)
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.stop(), 10)
            except Exception as e:
                log.error("event=pool_stop_failed error=%s", e)
        if self._metrics:
            server, thread = self._metrics
            server.shutdown()
            server.server_close()
        if self.ovs:
            self.ovs.stop()
        await self.status_server.stop()
        log.info("event=node_down")

    # -- commands (ipop-switch attach / detach) ---------------------------------------------
    async def _control(self, cmd: dict) -> dict:
        from ..config import ConfigError
        from .guests import spec_of
        op = cmd["cmd"]
        if op == "friends":   # ipop-switch friends ...: the social overlay's (agent/social.py)
            social = [o for o in self.overlays if o.social] if cmd.get("overlay") is None else \
                [self._overlay(cmd["overlay"])]
            if len(social) != 1 or social[0].social is None:
                raise IpopError("friends: no social overlay on this node" if not social else
                                "friends: say which social overlay (--overlay)")
            return await social[0].social.command(cmd)
        if op not in ("attach", "detach"):
            raise IpopError(f"unknown command {op!r} (attach, detach)")
        ov = self._overlay(cmd.get("overlay"))
        if ov.guests is None:
            raise IpopError(f"overlay {ov.cfg.name} is not started yet")
        if op == "attach":
            try:
                spec = spec_of(cmd.get("guest") or {})
            except ConfigError as e:
                raise IpopError(f"attach: {e}") from None
            g = await ov.guests.attach(spec)
        else:
            g = await ov.guests.detach(str(cmd.get("name") or ""))
        return {"ok": True, "overlay": ov.cfg.name, "guest": g.describe()}

    def _overlay(self, name: str | None):
        if name is None:
            if len(self.overlays) == 1:
                return self.overlays[0]
            raise IpopError(f"this node has {len(self.overlays)} overlays: say which (--overlay: "
                            f"{', '.join(o.cfg.name for o in self.overlays)})")
        for ov in self.overlays:
            if ov.cfg.name == name:
                return ov
        raise IpopError(f"no overlay {name!r} on this node ({', '.join(o.cfg.name for o in self.overlays)})")

    # -- status -------------------------------------------------------------------------
    async def _async_snapshot(self) -> dict:
        """Fresh link counters from the workers, then the snapshot."""
        await self.refresh_link_stats()
        for ov in self.overlays:
            await ov.refresh_switch_counters()
        return self.snapshot()

    async def refresh_link_stats(self) -> None:
        """Every link's counters, fresh from the workers (status, and the web view's summaries)."""
        if self.pool is not None:
            try:
                stats = await self.pool.stats(timeout=2.0)
            except Exception as e:
                log.debug("event=stats_failed error=%s", e)
                stats = []
            by_id = {s.get("link_id"): s for s in stats}
            for ov in self.overlays:
                for link in ov.links.values():
                    if link.link_id in by_id:
                        link.stats = by_id[link.link_id]     # already under status's names

    def snapshot(self) -> dict:
        return {
            "node": {
                "node_id": self.node_id,
                "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self.started, 1),
                "ovs": (f"system (unix:{self.ovs.db_sock}), datapath {self.ovs.datapath}" if self.ovs and self.ovs.external
                        else f"private, datapath {self.ovs.datapath}" if self.ovs else None),
                "tunnel_loops": accel.name(),       # C, or Python and why (the workers import the same)
                "notes": self.notes,
            },
            "overlays": [ov.snapshot() for ov in self.overlays],
            "web": self.web.status() if self.web else None,
        }


def kill_stale(rundir: Path) -> int:
    """Stop what a killed agent left running on our private OVS run directory: ovsdb-server,
    ovs-vswitchd and the switch app all name it on their command line."""
    needle = str(Path(rundir).absolute()).encode()
    me = os.getpid()
    count = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmd and proc.alive(int(d.name)):
            proc.terminate(int(d.name), grace=2.0)
            count += 1
    return count

