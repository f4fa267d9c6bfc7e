"""The agent's side of the tunnel workers: a small pool of worker processes.

Links are spread over N processes (default one per core), many per process, so links
use every core while memory stays flat (a process costs ~39 MB RSS, 18 MB of it its
own, docs/benchmarks.md; a link well under 1 MB). Each process has one channel (typed messages, messages.py). A crashed process
is restarted and its links re-opened; their "down" events come first so the agent
removes the ports of the vanished TAPs. The pool knows nothing of XMPP: outgoing
signaling arrives as Event("signal") for the agent to relay, incoming signaling is
handed in with ``deliver``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator

from ..errors import IpopError
from . import messages
from .messages import Event, LinkSpec

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX = 5.0


class PoolError(IpopError):
    pass


class _Proc:
    def __init__(self, index: int) -> None:
        self.index = index
        self.popen: subprocess.Popen | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task | None = None
        self.links: dict[str, LinkSpec] = {}
        self.restarts = 0
        self.started = 0.0


class WorkerPool:
    """``async with WorkerPool(2) as pool:`` then open_link / deliver / close_link; read ``events()``."""

    def __init__(self, processes: int | None = None, *, log_dir: Path | None = None,
                 python: str = sys.executable, log_level: str = "WARNING") -> None:
        n = processes if processes is not None else (os.cpu_count() or 1)
        if not 1 <= n <= 256:
            raise PoolError(f"worker processes must be 1..256, not {n}")
        self.n = n
        self.log_dir = Path(log_dir) if log_dir else None
        self.python = python
        self.log_level = log_level
        self.procs = [_Proc(i) for i in range(n)]
        self.where: dict[str, _Proc] = {}
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future] = {}
        self._req = itertools.count(1)
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> "WorkerPool":
        for p in self.procs:
            await self._spawn(p)
        return self

    async def stop(self) -> None:
        self._stopping = True
        for p in self.procs:
            if p.writer and not p.writer.is_closing():
                try:
                    p.writer.write(messages.encode({"kind": "exit"}))
                    await p.writer.drain()
                except (ConnectionError, RuntimeError):
                    pass
        for p in self.procs:
            await self._reap(p, grace=5.0)
        self.where.clear()

    async def __aenter__(self) -> "WorkerPool":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def pids(self) -> list[int]:
        return [p.popen.pid for p in self.procs if p.popen and p.popen.poll() is None]

    # -- links ---------------------------------------------------------------------------
    async def open_link(self, spec: LinkSpec) -> None:
        if spec.link_id in self.where:
            raise PoolError(f"link {spec.link_id} is already open")
        p = min(self.procs, key=lambda q: len(q.links))
        p.links[spec.link_id] = spec
        self.where[spec.link_id] = p
        await self._send(p, {"kind": "open", "spec": spec.to_json()})

    async def close_link(self, link_id: str, reason: str = "closed", notify_peer: bool = True) -> None:
        """Close a link; the agent removes its OVS port first (the TAP goes with the worker)."""
        p = self.where.pop(link_id, None)
        if p is None:
            return
        p.links.pop(link_id, None)
        await self._send(p, {"kind": "close", "link_id": link_id, "reason": reason, "notify_peer": notify_peer})

    async def deliver(self, link_id: str, type_: str, payload: dict) -> None:
        """A signaling message from the peer (link_offer / link_answer / link_close / link_restart)."""
        p = self.where.get(link_id)
        if p is not None:
            await self._send(p, {"kind": "signal", "link_id": link_id, "type": type_, "payload": payload})

    async def stats(self, timeout: float = 5.0) -> list[dict]:
        """Counters of every link (one request per process, answered from its loop)."""
        futs = []
        for p in self.procs:
            if p.writer is None:
                continue
            req = next(self._req)
            fut = asyncio.get_running_loop().create_future()
            self._pending[req] = fut
            futs.append((req, fut))
            await self._send(p, {"kind": "stats", "req": req})
        out: list[dict] = []
        for req, fut in futs:
            try:
                out += (await asyncio.wait_for(fut, timeout))["links"]
            except asyncio.TimeoutError:
                log.warning("pool process did not answer a stats request within %.0fs", timeout)
            finally:
                self._pending.pop(req, None)
        return out

    async def rekey(self, link_id: str, timeout: float = 5.0) -> bool:
        p = self.where.get(link_id)
        if p is None:
            return False
        req = next(self._req)
        fut = asyncio.get_running_loop().create_future()
        self._pending[req] = fut
        await self._send(p, {"kind": "rekey", "link_id": link_id, "req": req})
        try:
            return bool((await asyncio.wait_for(fut, timeout))["ok"])
        finally:
            self._pending.pop(req, None)

    async def next_event(self, timeout: float | None = None) -> Event:
        return await asyncio.wait_for(self._events.get(), timeout)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            yield await self._events.get()

    # -- processes -----------------------------------------------------------------------
    async def _spawn(self, p: _Proc) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        err = open(self.log_dir / f"worker{p.index}.log", "ab") if self.log_dir else None
        try:
            p.popen = subprocess.Popen(
                [self.python, "-m", "ipop_switch.tunnel.poolproc", "--fd", str(child.fileno()),
                 "--log-level", self.log_level],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, stdout=err or subprocess.DEVNULL,
                stderr=err or None,
                # a session of its own, as OVS and the switch app have: Ctrl-C in the agent's terminal
                # reaches only the agent, which closes the links in order (the process still ends
                # when its channel closes); else it quit first and was "restarted" mid-shutdown
                start_new_session=True)
        finally:
            child.close()
            if err:
                err.close()
        p.started = time.monotonic()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        p.writer = writer
        p.reader_task = asyncio.create_task(self._read(p, reader))
        for spec in list(p.links.values()):      # re-open the links of a restarted process
            await self._send(p, {"kind": "open", "spec": spec.to_json()})

    async def _send(self, p: _Proc, msg: dict) -> None:
        if p.writer is None or p.writer.is_closing():
            return                                  # restarting: the link is re-opened from p.links
        try:
            p.writer.write(messages.encode(msg))
            await p.writer.drain()
        except (ConnectionError, RuntimeError):
            pass

    async def _read(self, p: _Proc, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                try:
                    msg = await messages.read_msg(reader)
                except ValueError as e:
                    log.error("pool process %d: bad message: %s", p.index, e)
                    break
                if msg is None:
                    break
                self._dispatch(msg)
        finally:
            if not self._stopping:
                asyncio.get_running_loop().create_task(self._restart(p))

    def _dispatch(self, msg: dict) -> None:
        kind = msg["kind"]
        if kind in ("stats", "rekey"):
            fut = self._pending.get(msg.get("req"))
            if fut and not fut.done():
                fut.set_result(msg)
            return
        link_id = str(msg.get("link_id", ""))
        if kind == "closed" and link_id in self.where:
            return                                   # a stale close of a re-opened link
        self._events.put_nowait(Event(kind, link_id, msg))

    async def _reap(self, p: _Proc, grace: float) -> None:
        if p.writer:
            p.writer.close()
        if p.popen:
            deadline = time.monotonic() + grace
            while p.popen.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if p.popen.poll() is None:
                p.popen.kill()
                await asyncio.sleep(0.05)
                try:
                    p.popen.wait(2)
                except subprocess.TimeoutExpired:
                    pass
        if p.reader_task and p.reader_task is not asyncio.current_task():
            p.reader_task.cancel()
        p.writer = None

    async def _restart(self, p: _Proc) -> None:
        """The process died (or its channel broke): report its links down, start it again."""
        rc = p.popen.poll() if p.popen else None
        log.warning("pool process %d (pid %s) ended (rc=%s); restarting with %d links",
                    p.index, p.popen.pid if p.popen else None, rc, len(p.links))
        await self._reap(p, grace=1.0)
        for link_id, spec in p.links.items():
            self._events.put_nowait(Event("down", link_id, {"kind": "down", "link_id": link_id,
                                    "peer_id": spec.peer_id, "tap": spec.tap, "reason": "worker process crashed"}))
        self._events.put_nowait(Event("pool_restart", "", {"kind": "pool_restart", "index": p.index, "rc": rc}))
        if time.monotonic() - p.started < 10:
            p.restarts += 1
        else:
            p.restarts = 0
        await asyncio.sleep(min(RESTART_BACKOFF_MAX, 0.1 * (2 ** p.restarts) if p.restarts else 0.0))
        if not self._stopping:
            await self._spawn(p)
