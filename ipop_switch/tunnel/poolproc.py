"""Main loop of one pool process: many link workers on one event loop (uvloop).

Started by WorkerPool with the channel socket as an inherited fd; it exits when the
channel closes (the agent died or stopped it), closing every link and its TAP.
``python -m ipop_switch.tunnel.poolproc --fd N``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from ..netwatch import AddressWatch
from . import messages
from .link import LinkWorker
from .messages import LinkSpec

log = logging.getLogger("ipop_switch.tunnel.pool")


class PoolProcess:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.links: dict[str, LinkWorker] = {}
        self.watch = AddressWatch()       # one per process, for every link in it

    def _addresses_changed(self) -> None:
        for w in self.links.values():
            w.addresses_changed()

    def emit(self, msg: dict) -> None:
        if not self.writer.is_closing():
            self.writer.write(messages.encode(msg))

    async def run(self) -> None:
        if self.watch.start():
            self.watch.subscribe(self._addresses_changed)
        try:
            while True:
                msg = await messages.read_msg(self.reader)
                if msg is None:
                    break
                try:
                    await self.handle(msg)
                except Exception as e:                     # one bad request must not stop the others
                    log.exception("request %s failed", msg.get("kind"))
                    self.emit({"kind": "error", "link_id": str(msg.get("link_id") or ""), "error": f"{type(e).__name__}: {e}"})
                if msg.get("kind") == "exit":
                    break
        finally:
            self.watch.stop()
            await asyncio.gather(*(w.close("pool exit", notify_peer=False) for w in list(self.links.values())),
                                 return_exceptions=True)
            self.links.clear()
            try:
                await self.writer.drain()
            except Exception:
                pass

    async def handle(self, msg: dict) -> None:
        kind = msg["kind"]
        if kind == "open":
            spec = LinkSpec.from_json(msg["spec"])
            if spec.link_id in self.links:
                raise ValueError(f"link {spec.link_id} is already open")
            w = LinkWorker(spec, self.emit)
            w.poll_addresses = not self.watch.running
            w.start()
            self.links[spec.link_id] = w
        elif kind == "close":
            w = self.links.pop(msg["link_id"], None)
            if w is not None:
                await w.close(msg.get("reason", "closed"), notify_peer=bool(msg.get("notify_peer", True)))
        elif kind == "signal":
            w = self.links.get(msg["link_id"])
            if w is not None:
                w.on_signal(msg["type"], msg["payload"])
        elif kind == "stats":
            self.emit({"kind": "stats", "req": msg["req"], "pid": os.getpid(),
                       "links": [w.snapshot() for w in self.links.values()]})
        elif kind == "rekey":
            w = self.links.get(msg["link_id"])
            self.emit({"kind": "rekey", "req": msg.get("req"), "ok": bool(w and w.rekey_now())})
        elif kind == "exit":
            pass
        else:
            raise ValueError(f"unknown request kind {kind!r}")


async def amain(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    loop = asyncio.get_running_loop()
    pp = PoolProcess(reader, writer)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: reader.feed_eof())
    await pp.run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ipop-switch-worker")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--log-level", default=os.environ.get("IPSW_WORKER_LOG", "WARNING"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level, stream=sys.stderr,
                        format=f"%(asctime)s worker[{os.getpid()}] %(name)s %(levelname)s %(message)s")
    logging.getLogger("aioice").setLevel(os.environ.get("IPSW_AIOICE_LOG", "WARNING"))
    try:
        import uvloop
        uvloop.run(amain(a.fd))
    except ImportError:
        asyncio.run(amain(a.fd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
