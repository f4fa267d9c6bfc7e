"""Port prediction (birthday probing): a direct path between an endpoint-dependent mapping
("hard" NAT: a new public port per destination) and an endpoint-independent one ("easy",
CGNAT), where ICE alone can only relay (docs/nat.md).

The trick is Tailscale's. ICE fails there because the hard side's public port towards the
easy side is unknown: its srflx candidate is its mapping towards the STUN server, and the
easy side's filter drops whatever the hard side sends before the easy side sent there.
So, while the relayed link already carries frames:

- the hard side opens ``sockets`` (256) UDP sockets and sends one authenticated request
  from each to the easy side's srflx address: its NAT gives each a random public port,
  and the easy side's filter drops them all (they are only there to open mappings);
- the easy side sends ``probes`` (1024) requests from the socket behind that srflx to
  random ports of the hard side's public address, at most ``rate`` a second. Each opens
  its own filter for the port it targets; one that hits a port the hard NAT mapped
  reaches that socket, whose answer comes back through the filter that probe opened.

The first authenticated message from the peer on a (socket, address) is the path; every
other socket is closed at once. With ``n`` sockets uniformly mapped over ``N`` ports and
``k`` distinct probes, the chance that none hits is C(N-n, k) / C(N, k) ~ (1 - n/N)^k:
1.7 % for 256 sockets, 1024 probes and the 64512 ports Linux's ``fully-random`` draws
from (``expected_success``).

Roles come from the candidates both sides already exchanged (no extra signaling): a srflx
candidate whose port differs from its base's is the mark of a port-changing NAT (taken as
hard), one that keeps it of a port-preserving, endpoint-independent one (easy). Only the
pair hard + easy runs; hard + hard, UDP blocked or no srflx at all stay relayed.

Every message carries a MAC keyed by both ends' ICE credentials of the attempt (they went
through signed, sealed signaling) and the sender's role, so nobody else can make a path
and a message cannot be reflected back to its sender. Nothing here knows XMPP or links:
link.py runs one ``Prediction`` and swaps its send function on a win.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import random
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

PROBE = 0xE8                    # first byte: neither ours (0xE1-0xE3), STUN (0x00-0x3F) nor ChannelData
REQ, RESP = 0, 1
HARD, EASY = b"H", b"E"
_MSG = struct.Struct("!BcB8s16s")   # type, sender role, request/response, nonce, tag
PORT_LO, PORT_HI = 1024, 65535      # where Linux NAT draws unspecified ports from (nf_nat: >= 1024)

# one hard side's run at a time per process: each holds 256 sockets while it runs
_busy = asyncio.Lock()


@dataclass(frozen=True)
class Settings:
    sockets: int = 256          # hard side: sockets (public ports) opened
    probes: int = 1024          # easy side: distinct ports probed
    rate: float = 1000.0        # easy side: probes per second, at most
    start_delay: float = 0.3    # easy side: let the hard side's mappings exist first
    rounds: int = 3             # hard side: requests per socket, one a second
    linger: float = 1.5         # both: how long to wait for answers after the last send


def expected_success(sockets: int, probes: int, ports: int = PORT_HI - PORT_LO + 1) -> float:
    """The chance that ``probes`` distinct random ports hit one of ``sockets`` random ports."""
    if sockets <= 0 or probes <= 0:
        return 0.0
    if sockets + probes > ports:
        return 1.0
    # C(N-n, k) / C(N, k) = prod_{i<k} (N-n-i)/(N-i), in logs
    miss = sum(math.log((ports - sockets - i) / (ports - i)) for i in range(probes))
    return 1.0 - math.exp(miss)


@dataclass(frozen=True)
class Plan:
    """What one side does: ``role`` HARD (many sockets) or EASY (the prober)."""
    role: bytes
    easy_addr: tuple[str, int]       # the easy side's srflx: where the hard side's sockets send
    easy_base: tuple[str, int]       # the easy side's host socket behind it (the prober)
    hard_ip: str                     # the hard side's public address: where the easy side probes
    hard_base: str                   # the hard side's host address (its sockets bind there)


def _srflx(cands: list) -> list:
    """srflx candidates with their base, best first (the same order on both sides)."""
    out = [c for c in cands if c.type == "srflx" and c.related_address and c.related_port
           and ":" not in c.host]
    return sorted(out, key=lambda c: (-c.priority, c.host, c.port))


def mapping(cands: list) -> str:
    """'hard' (a srflx port differs from its base's), 'easy' (all kept), or 'unknown'."""
    s = _srflx(cands)
    if not s:
        return "unknown"
    return "hard" if any(c.port != c.related_port for c in s) else "easy"


def plan(local: list, remote: list) -> Plan | None:
    """This side's part, from both sides' candidates (aioice ``Candidate``s); None unless one
    side maps hard and the other easy."""
    ml, mr = mapping(local), mapping(remote)
    if {ml, mr} != {"hard", "easy"}:
        return None
    easy, hard = (local, remote) if ml == "easy" else (remote, local)
    e, h = _srflx(easy)[0], _srflx(hard)[0]
    return Plan(EASY if ml == "easy" else HARD, (e.host, e.port), (e.related_address, e.related_port),
                h.host, h.related_address)


def key(controlling: tuple[str, str], controlled: tuple[str, str]) -> bytes:
    """The attempt's probe key from both ends' ICE (ufrag, pwd)."""
    h = hashlib.sha256(b"ipsw-predict-v1")
    for part in (*controlling, *controlled):
        h.update(len(part).to_bytes(2, "big") + part.encode())
    return h.digest()


def pack(k: bytes, role: bytes, kind: int, nonce: bytes) -> bytes:
    tag = hmac.new(k, bytes([PROBE]) + role + bytes([kind]) + nonce, hashlib.sha256).digest()[:16]
    return _MSG.pack(PROBE, role, kind, nonce, tag)


def parse(k: bytes, data: bytes, want_role: bytes) -> tuple[int, bytes] | None:
    """(kind, nonce) of an authentic message from ``want_role``, else None."""
    if len(data) != _MSG.size:
        return None
    t, role, kind, nonce, tag = _MSG.unpack(data)
    if t != PROBE or role != want_role or kind not in (REQ, RESP):
        return None
    good = hmac.new(k, bytes([PROBE]) + role + bytes([kind]) + nonce, hashlib.sha256).digest()[:16]
    return (kind, nonce) if hmac.compare_digest(tag, good) else None


class _Sock(asyncio.DatagramProtocol):
    """One of the hard side's sockets. Once it wins, the link hooks it like an ICE socket
    (ice.install_hook needs ``transport`` and ``datagram_received``)."""

    def __init__(self, run: "Prediction") -> None:
        self.run = run
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.run.received(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        pass

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class Win:
    protocol: object          # the socket's protocol (hard side: a _Sock; easy side: the ICE one)
    addr: tuple[str, int]     # the peer's address on it
    after: float              # seconds from the start of the run
    probes: int               # probes (easy) or requests (hard) sent until then


class Prediction:
    """One run of one side. ``easy_protocol``: on the easy side, the ICE socket behind its
    srflx (its ``transport.sendto`` sends; ``received`` must be given what arrives on it with
    the first byte ``PROBE``, see ice.set_side_handler)."""

    def __init__(self, p: Plan, k: bytes, settings: Settings = Settings(), *, easy_protocol=None,
                 ports: Callable[[int], list[int]] | None = None) -> None:
        self.plan = p
        self.key = k
        self.s = settings
        self.peer_role = EASY if p.role == HARD else HARD
        self.easy_protocol = easy_protocol
        self._ports = ports or (lambda n: random.sample(range(PORT_LO, PORT_HI + 1), n))
        self.socks: list[_Sock] = []
        self.won: asyncio.Future | None = None
        self.sent = 0
        self.bad = 0               # messages that failed authentication
        self._t0 = 0.0
        self._kept: _Sock | None = None

    def received(self, protocol, data: bytes, addr: tuple) -> None:
        """A datagram starting with ``PROBE`` on one of our sockets: answer a request, win on
        the first authentic message (counted and ignored if not authentic)."""
        m = parse(self.key, data, self.peer_role)
        if m is None:
            self.bad += 1
            return
        kind, nonce = m
        if kind == REQ:
            try:
                protocol.transport.sendto(pack(self.key, self.plan.role, RESP, nonce), addr)
            except (OSError, AttributeError):
                return
        if self.won is not None and not self.won.done():
            self.won.set_result(Win(protocol, (addr[0], addr[1]), time.monotonic() - self._t0, self.sent))

    async def run(self) -> Win | None:
        """Probe until a win or the end of the run; every socket but the winner is closed."""
        if self.plan.role == HARD:
            async with _busy:
                return await self._run()
        return await self._run()

    async def _run(self) -> Win | None:
        loop = asyncio.get_running_loop()
        self.won = loop.create_future()
        self._t0 = time.monotonic()
        sender = self._hard() if self.plan.role == HARD else self._easy()
        task = asyncio.ensure_future(sender)
        try:
            budget = self._duration() + self.s.linger
            done, _ = await asyncio.wait({self.won}, timeout=budget)
            win = self.won.result() if done else None
        except BaseException:            # cancelled: the attempt ended
            self.close_all()
            raise
        finally:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if win is not None and isinstance(win.protocol, _Sock):
            self._kept = win.protocol
            # a few more requests from the winner: the peer wins too if our answer was lost
            for _ in range(3):
                self._send(win.protocol, REQ, self.plan.easy_addr)
        self.close(keep=self._kept)
        return win

    def _duration(self) -> float:
        if self.plan.role == HARD:
            return float(self.s.rounds)
        return self.s.start_delay + self.s.probes / self.s.rate

    def _send(self, protocol, kind: int, addr: tuple) -> None:
        try:
            protocol.transport.sendto(pack(self.key, self.plan.role, kind, os.urandom(8)), addr)
            self.sent += 1
        except (OSError, AttributeError):
            pass

    async def _hard(self) -> None:
        loop = asyncio.get_running_loop()
        fam = socket.AF_INET
        for _ in range(self.s.sockets):
            try:
                _, proto = await loop.create_datagram_endpoint(lambda: _Sock(self), family=fam,
                                                               local_addr=(self.plan.hard_base, 0))
            except OSError as e:           # out of descriptors or ports: go with what we have
                log.info("port prediction: %d sockets (%s)", len(self.socks), e)
                break
            self.socks.append(proto)
            self._send(proto, REQ, self.plan.easy_addr)
        for _ in range(self.s.rounds - 1):
            await asyncio.sleep(1.0)
            for proto in self.socks:
                self._send(proto, REQ, self.plan.easy_addr)

    async def _easy(self) -> None:
        await asyncio.sleep(self.s.start_delay)
        ports = self._ports(self.s.probes)
        batch = max(1, int(self.s.rate / 100))          # a batch each 10 ms
        for i in range(0, len(ports), batch):
            for port in ports[i:i + batch]:
                self._send(self.easy_protocol, REQ, (self.plan.hard_ip, port))
            await asyncio.sleep(batch / self.s.rate)

    def close(self, keep: _Sock | None = None) -> None:
        """Close every socket of the run (but ``keep``, the winner the link now uses)."""
        for s in self.socks:
            if s is not keep:
                s.close()
        self.socks = [keep] if keep is not None else []

    def close_all(self) -> None:
        """The link's attempt ended: the winner's socket too."""
        self.close()
        self._kept = None
