"""Test-side driver of link_node.py harnesses: starts one per lab host, relays the workers'
signaling between hosts (standing in for the agents and XMPP), and waits for events.
Everything talks over unix sockets: the test process never sends to a lab address."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from ipop_switch import proc
from ipop_switch.tunnel import LinkSpec, TurnServer

HELPER = Path(__file__).parent / "link_node.py"
START_TIMEOUT = 20.0
REQ_TIMEOUT = 20.0


def x25519_pair() -> tuple[bytes, bytes]:
    k = X25519PrivateKey.generate()
    return (k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


class NodeClient:
    """One harness process in a lab host's namespace."""

    def __init__(self, lab, host: str, processes: int = 1, relay=None) -> None:
        self.lab = lab
        self.host = host
        self.processes = processes
        self.rundir = Path(lab.dir) / f"links-{host}"
        self.sock = str(self.rundir / "harness.sock")
        self.node_id = secrets.token_hex(16)
        self.key_priv, self.key_pub = x25519_pair()
        self.events: list[dict] = []
        self._cond = asyncio.Condition()
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self.relay = relay
        self.popen: subprocess.Popen | None = None
        self._relays: set[asyncio.Task] = set()

    async def start(self) -> "NodeClient":
        self.rundir.mkdir(parents=True, exist_ok=True)
        log = open(self.rundir / "harness.log", "ab")
        self.popen = self.lab.popen(self.host, [sys.executable, str(HELPER), self.sock, str(self.rundir),
                                                "--processes", str(self.processes)],
                                    stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.sock):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"harness on {self.host} did not start: {self.log_tail()}")
            await asyncio.sleep(0.05)
        self.reader, self.writer = await asyncio.open_unix_connection(self.sock)
        self._task = asyncio.create_task(self._read())
        return self

    def log_tail(self, n: int = 3000) -> str:
        out = []
        for f in sorted(self.rundir.glob("*.log")):
            try:
                out.append(f"--- {f.name}\n" + f.read_text()[-n:])
            except OSError:
                pass
        return "\n".join(out)

    async def _read(self) -> None:
        while True:
            line = await self.reader.readline()
            if not line:
                break
            msg = json.loads(line)
            if "re" in msg:
                fut = self._pending.pop(msg["re"], None)
                if fut and not fut.done():
                    fut.set_result(msg)
                continue
            if msg.get("ev") == "signal" and self.relay:
                # not awaited here: the peer's reply comes through its own reader, and two
                # readers waiting on each other would deadlock
                t = asyncio.create_task(self.relay(self, msg))
                self._relays.add(t)
                t.add_done_callback(self._relays.discard)
            async with self._cond:
                self.events.append(msg)
                self._cond.notify_all()

    async def req(self, op: str, timeout: float = REQ_TIMEOUT, **kw) -> dict:
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self.writer.write((json.dumps({"id": rid, "op": op, **kw}) + "\n").encode())
        await self.writer.drain()
        rep = await asyncio.wait_for(fut, timeout)
        if not rep.get("ok"):
            raise RuntimeError(f"{self.host} {op}: {rep.get('error')}\n{rep.get('tb', '')}")
        return rep

    async def wait_event(self, pred, timeout: float, what: str, since: int = 0) -> dict:
        """First event (from index ``since``) matching pred, within timeout."""
        deadline = time.monotonic() + timeout
        async with self._cond:
            while True:
                for ev in self.events[since:]:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.host}: no {what} within {timeout:.0f}s; events: "
                                       f"{[(e.get('ev'), e.get('link_id'), e.get('reason') or e.get('type')) for e in self.events[-12:]]}")
                try:
                    await asyncio.wait_for(self._cond.wait(), left)
                except asyncio.TimeoutError:
                    pass

    async def link_stats(self, link_id: str) -> dict:
        for s in (await self.req("stats"))["links"]:
            if s["link_id"] == link_id:
                return s
        raise KeyError(link_id)

    async def stop(self) -> None:
        try:
            await self.req("exit", timeout=10)
        except (RuntimeError, asyncio.TimeoutError, ConnectionError, OSError):
            pass                      # the harness is gone already: it is waited for or killed below
        if self.popen:
            try:
                await asyncio.to_thread(self.popen.wait, 15)
            except subprocess.TimeoutExpired:
                proc.terminate(self.popen.pid)
        if hasattr(self, "_task"):
            self._task.cancel()


@dataclass
class LinkPair:
    link_id: str
    a: NodeClient
    b: NodeClient
    index: int
    addr_a: str
    addr_b: str
    bridge: str
    opened_at: float = 0.0


class RelayError(AssertionError):
    """A signaling message the test relayed was refused or lost: the link under test would wait
    for it (a stand-in for XMPP must not drop messages silently, or a test fails far from the cause)."""


class Mesh:
    """Harnesses on several hosts plus the relay of their signaling messages."""

    def __init__(self, lab) -> None:
        self.lab = lab
        self.nodes: dict[str, NodeClient] = {}
        self.links: dict[str, LinkPair] = {}
        self.relayed: list[tuple[str, str, str]] = []
        self.relayed_at: list[float] = []       # time.monotonic() of each entry of relayed
        self.relay_errors: list[str] = []
        self.block_signaling: set[str] = set()
        self.stopping = False         # messages of links closing at stop are not relayed

    def check_relay(self) -> None:
        """Fail if any relayed message could not be delivered."""
        if self.relay_errors:
            raise RelayError("signaling relay failed: " + "; ".join(self.relay_errors[:5])
                             + (f" (+{len(self.relay_errors) - 5} more)" if len(self.relay_errors) > 5 else ""))

    async def _relay(self, src: NodeClient, msg: dict) -> None:
        lp = self.links.get(msg["link_id"])
        if lp is None or msg["link_id"] in self.block_signaling or self.stopping:
            return
        dst = lp.b if src is lp.a else lp.a
        self.relayed.append((src.host, msg["type"], msg["link_id"]))
        self.relayed_at.append(time.monotonic())
        try:
            await dst.req("deliver", link_id=msg["link_id"], type=msg["type"], payload=msg["payload"])
        except Exception as e:       # recorded, and raised by check_relay (wait_up, stop)
            self.relay_errors.append(f"{src.host}->{dst.host} {msg['type']} {msg['link_id']}: "
                                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    async def start(self, hosts: list[str], processes: int = 1) -> "Mesh":
        clients = [NodeClient(self.lab, h, processes, relay=self._relay) for h in hosts]
        await asyncio.gather(*(c.start() for c in clients))
        for c in clients:
            self.nodes[c.host] = c
        return self

    def turn(self, transport: str = "udp") -> TurnServer:
        t = self.lab.services()["turn"]
        return TurnServer(t["address"], t["port"], t["user"], t["password"], transport)

    async def open(self, a: str, b: str, *, index: int, transport_a: str = "udp", transport_b: str = "udp",
                   timers: dict | None = None, bridge: bool = True, mtu: int = 1400,
                   port_prediction: bool = True) -> LinkPair:
        """One link between hosts a and b, each end a port of its own bridge ipswb<index>
        whose LOCAL port has 100.97.<index>.1 (a) / .2 (b). ``port_prediction=False`` keeps a
        relayed hard<->easy link on the relay (a test of the relayed path itself)."""
        na, nb = self.nodes[a], self.nodes[b]
        link_id = f"L{index}-{a}-{b}"
        br = f"ipswb{index}"
        lp = LinkPair(link_id, na, nb, index, f"100.97.{index}.1", f"100.97.{index}.2", br)
        self.links[link_id] = lp
        t = self.lab.services()["turn"]
        stun = (t["address"], t["port"])
        specs = []
        for me, peer, addr, tr in ((na, nb, lp.addr_a, transport_a), (nb, na, lp.addr_b, transport_b)):
            if bridge:
                await me.req("bridge", name=br, addr=f"{addr}/24", mtu=mtu)
            specs.append(LinkSpec(
                link_id=link_id, peer_id=peer.node_id, controlling=me.node_id > peer.node_id,
                local_static=me.key_priv, peer_static=peer.key_pub, tap=f"ipt{index}",
                mtu=mtu, stun=stun, turn=self.turn(tr), timers=timers or {}, port_prediction=port_prediction))
        lp.opened_at = time.monotonic()
        await asyncio.gather(na.req("open", spec=specs[0].to_json(), bridge=br if bridge else None),
                             nb.req("open", spec=specs[1].to_json(), bridge=br if bridge else None))
        return lp

    async def wait_up(self, lp: LinkPair, timeout: float, since: tuple[int, int] = (0, 0)) -> tuple[dict, dict]:
        try:
            ea, eb = await asyncio.gather(
                lp.a.wait_event(lambda e: e.get("ev") == "up" and e.get("link_id") == lp.link_id, timeout, f"up {lp.link_id}", since[0]),
                lp.b.wait_event(lambda e: e.get("ev") == "up" and e.get("link_id") == lp.link_id, timeout, f"up {lp.link_id}", since[1]))
        except TimeoutError:
            self.check_relay()          # a lost message is the likelier cause: say so
            raise
        self.check_relay()
        return ea, eb

    async def ping(self, host: str, addr: str, count: int = 3, timeout: float = 10.0, size: int | None = None,
                   pattern: str | None = None) -> subprocess.CompletedProcess:
        argv = ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", "-w", str(int(timeout))]
        if size:
            argv += ["-s", str(size)]
        if pattern:
            argv += ["-p", pattern]
        return await asyncio.to_thread(self.lab.exec, host, argv + [addr], check=False, timeout=timeout + 5)

    async def stop(self) -> None:
        self.stopping = True
        await asyncio.gather(*(c.stop() for c in self.nodes.values()), return_exceptions=True)
        self.check_relay()


def run(coro, timeout: float):
    """Run an async scenario with a hard bound."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())
