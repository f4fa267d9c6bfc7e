"""Test harness for one lab host: a WorkerPool, a private OVS with one bridge per link
(fail_mode=standalone: a learning switch until the OpenFlow app exists), TAPs added as
ports on "up" and removed on "down"/before close. It stands in for the agent: the test
relays signaling between hosts over this harness's unix socket (JSON lines).

usage: link_node.py SOCKET_PATH RUNDIR [--processes N]
requests {"id", "op", ...}: bridge(name, addr, mtu) | open(spec, bridge) | deliver(link_id, type, payload)
         | close(link_id) | stats | rekey(link_id) | pids | ports(bridge) | exit
replies {"re": id, "ok": bool, ...}; events {"ev": kind, ...} (signal, up, down, closed, pool_restart, error)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import traceback
from pathlib import Path

from ipop_switch import proc
from ipop_switch.bridge.ovs import OvsInstance
from ipop_switch.tunnel import LinkSpec, WorkerPool


class Node:
    def __init__(self, rundir: Path, processes: int) -> None:
        self.rundir = rundir
        self.ovs = OvsInstance(rundir / "ovs")
        self.pool = WorkerPool(processes, log_dir=rundir, log_level=os.environ.get("IPSW_WORKER_LOG", "WARNING"))
        self.bridge_of: dict[str, str] = {}     # link id -> bridge
        self.tap_of: dict[str, str] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.t0 = time.monotonic()

    def send(self, msg: dict) -> None:
        if self.writer and not self.writer.is_closing():
            self.writer.write((json.dumps(msg) + "\n").encode())

    async def events(self) -> None:
        async for ev in self.pool.events():
            d = dict(ev.data)
            d["ev"] = ev.kind
            d["t"] = time.monotonic()
            if ev.kind == "up" and ev.link_id in self.bridge_of:
                br, tap = self.bridge_of[ev.link_id], self.tap_of[ev.link_id]
                try:
                    await asyncio.to_thread(self.ovs.del_port, br, tap)
                    await asyncio.to_thread(self.ovs.add_port, br, tap)
                except Exception as e:
                    d["port_error"] = str(e)
            elif ev.kind == "down" and ev.link_id in self.bridge_of:
                await asyncio.to_thread(self.ovs.del_port, self.bridge_of[ev.link_id], self.tap_of[ev.link_id])
            self.send(d)

    async def handle(self, req: dict) -> dict:
        op = req["op"]
        if op == "bridge":
            name = req["name"]
            await asyncio.to_thread(self.ovs.add_bridge, name, fail_mode="standalone")
            self.ovs.vsctl("set", "interface", name, f"mtu_request={req.get('mtu', 1400)}")
            proc.run(["ip", "link", "set", name, "up"])
            if req.get("addr"):
                proc.run(["ip", "addr", "replace", req["addr"], "dev", name])
            return {}
        if op == "open":
            spec = LinkSpec.from_json(req["spec"])
            if req.get("bridge"):
                self.bridge_of[spec.link_id] = req["bridge"]
            self.tap_of[spec.link_id] = spec.tap
            await self.pool.open_link(spec)
            return {}
        if op == "deliver":
            await self.pool.deliver(req["link_id"], req["type"], req["payload"])
            return {}
        if op == "close":
            lid = req["link_id"]
            if lid in self.bridge_of:
                await asyncio.to_thread(self.ovs.del_port, self.bridge_of.pop(lid), self.tap_of[lid])
            await self.pool.close_link(lid, reason=req.get("reason", "closed"))
            return {}
        if op == "stats":
            return {"links": await self.pool.stats()}
        if op == "rekey":
            return {"rekeyed": await self.pool.rekey(req["link_id"])}
        if op == "pids":
            return {"pids": self.pool.pids(), "self": os.getpid(),
                    "ovs": [p.pid for p in self.ovs.procs.values()]}
        if op == "ports":
            return {"ports": self.ovs.ports(req["bridge"])}
        raise ValueError(f"unknown op {op}")

    async def serve(self, sock_path: str) -> None:
        await asyncio.to_thread(self.ovs.start)
        await self.pool.start()
        done = asyncio.Event()

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writer = writer
            while True:
                line = await reader.readline()
                if not line:
                    break
                req = json.loads(line)
                if req.get("op") == "exit":
                    self.send({"re": req.get("id"), "ok": True})
                    break
                try:
                    rep = {"re": req.get("id"), "ok": True, **(await self.handle(req))}
                except Exception as e:
                    rep = {"re": req.get("id"), "ok": False, "error": f"{type(e).__name__}: {e}",
                           "tb": traceback.format_exc()[-800:]}
                self.send(rep)
            done.set()

        server = await asyncio.start_unix_server(client, path=sock_path)
        ev_task = asyncio.create_task(self.events())
        try:
            await done.wait()
        finally:
            server.close()
            ev_task.cancel()
            for lid, br in list(self.bridge_of.items()):
                try:
                    self.ovs.del_port(br, self.tap_of[lid])
                except Exception:
                    pass
            await self.pool.stop()
            self.ovs.stop()
            try:
                os.unlink(sock_path)
            except FileNotFoundError:
                pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sock")
    ap.add_argument("rundir", type=Path)
    ap.add_argument("--processes", type=int, default=1)
    a = ap.parse_args()
    a.rundir.mkdir(parents=True, exist_ok=True)
    node = Node(a.rundir, a.processes)
    try:
        import uvloop
        uvloop.run(node.serve(a.sock))
    except ImportError:
        asyncio.run(node.serve(a.sock))


if __name__ == "__main__":
    main()
