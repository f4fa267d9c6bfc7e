"""Tells the agent when the ports of an OVS may have changed, from OVS's own database:
``ovsdb-client monitor`` of the Interface table prints a line on every change (a port added
by libvirt or a user, one removed, an external-id set, an ofport assigned). An event, not a
poll; the agent then reads the bridge's ports and reconciles (debounced: a burst of lines is
one reconcile). Used with the system's OVS, where others plug ports into our bridge."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Awaitable, Callable

from .. import proc
from .ovs import OvsInstance

log = logging.getLogger("ipop_switch.bridge")

DEBOUNCE = 0.05      # s: lines of one update arrive together
RESPAWN = 1.0        # s: after the monitor ended (OVS restarted), try again this often


class PortWatch:
    def __init__(self, ovs: OvsInstance, on_change: Callable[[], Awaitable[None]]) -> None:
        self.ovs = ovs
        self.on_change = on_change
        self.syncs = 0
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._proc: asyncio.subprocess.Process | None = None

    def start(self) -> None:
        self._dirty.set()         # the ports already there
        self._tasks = [asyncio.create_task(self._monitor(), name="ovs-port-monitor"),
                       asyncio.create_task(self._sync(), name="ovs-port-sync")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._kill()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass
        self._proc = None

    async def _monitor(self) -> None:
        argv = ["ovsdb-client", "monitor", f"unix:{self.ovs.db_sock}", "Open_vSwitch", "Interface",
                "name,external_ids,ofport"]
        try:
            while True:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL, preexec_fn=proc._die_with(os.getpid()))
                assert self._proc.stdout is not None
                while await self._proc.stdout.readline():
                    self._dirty.set()
                await self._proc.wait()
                log.warning("event=ovs_monitor_ended rc=%s db=%s (retrying)", self._proc.returncode, self.ovs.db_sock)
                self._dirty.set()
                await asyncio.sleep(RESPAWN)
        finally:
            self._kill()

    async def _sync(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(DEBOUNCE)
            self._dirty.clear()
            try:
                await self.on_change()
                self.syncs += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:     # OVS restarting, a port gone meanwhile: the next line retries
                log.warning("event=ovs_port_sync_failed error=%s (retrying)", e)
                await asyncio.sleep(RESPAWN)
                self._dirty.set()
