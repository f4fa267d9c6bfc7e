"""A small authoritative DNS responder for one overlay's zone, on the agent's asyncio loop.

Packets are parsed and built with dnslib (pure Python, no dependencies; we need the wire
format only, not a resolver or a server framework), and served on asyncio UDP datagram
endpoints (one per listen address). Per query:

- a name in the zone: its A/AAAA records (authoritative), NODATA for a type it lacks,
  NXDOMAIN with the zone's SOA (so resolvers cache the miss briefly) for no such name;
- a name outside the zone: REFUSED, or relayed to the configured upstreams (``forward``)
  and their answer relayed back (at most MAX_INFLIGHT at once, FORWARD_TIMEOUT each);
- a datagram that is not a DNS query (malformed, a response, too large): dropped and
  counted by reason, never answered, never an exception out of the protocol.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from typing import Callable

from dnslib import AAAA, QTYPE, RCODE, RR, SOA, A, DNSHeader, DNSRecord

from ..errors import IpopError
from .names import NameTable

log = logging.getLogger("ipop_switch.naming")

MAX_QUERY = 4096          # bytes; a larger datagram is no query of ours
MAX_INFLIGHT = 64         # forwarded queries waiting for an upstream
FORWARD_TIMEOUT = 2.0     # seconds per upstream
NEGATIVE_TTL = 10         # SOA minimum: how long a resolver may cache "no such name"
CLASS_IN = 1


class _Forward:
    """``respond``'s marker: relay this query upstream."""


FORWARD = _Forward()


class DnsResponder:
    """Answers for one zone from ``table()`` (called per query: the caller caches it)."""

    def __init__(self, table: Callable[[], NameTable], *, listen: list[tuple[str, int]],
                 forward: list[tuple[str, int]] | None = None, ttl: int = 60) -> None:
        self.table = table
        self.listen = list(listen)
        self.forward = list(forward or [])
        self.ttl = ttl
        self.counts: Counter[str] = Counter()     # queries, answers, nodata, nxdomain, refused, forwarded
        self.drops: Counter[str] = Counter()      # malformed, not_query, too_large, forward_busy, forward_failed
        self._transports: list[asyncio.DatagramTransport] = []
        self._inflight: set[asyncio.Task] = set()

    # -- sockets ------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind every listen address; the first that fails closes the others and raises one line."""
        loop = asyncio.get_running_loop()
        for host, port in self.listen:
            # bound here, not by the loop: uvloop's error for a taken address has no errno
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind((host, port))
                t, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
            except OSError as e:
                sock.close()
                await self.stop()
                hint = " (another DNS server there? set [overlay.dns] port or listen)" if e.errno == 98 else ""
                raise IpopError(f"dns: cannot listen on {_fmt(host, port)}: {e.strerror or e}{hint}") from None
            self._transports.append(t)

    async def stop(self) -> None:
        for t in self._transports:
            t.close()
        self._transports.clear()
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    def status(self) -> dict:
        try:
            tab = self.table()
            names, conflicts, zone = len(tab), tab.conflicts, tab.zone
        except Exception as e:            # status must not fail with the table
            names, conflicts, zone = None, [f"table failed: {e}"], None
        return {"zone": zone, "listen": [_fmt(h, p) for h, p in self.listen],
                "forward": [_fmt(h, p) for h, p in self.forward], "names": names, "conflicts": conflicts,
                **{k: self.counts.get(k, 0) for k in ("queries", "answers", "nodata", "nxdomain", "refused", "forwarded")},
                "drops": dict(self.drops)}

    def _datagram(self, transport: asyncio.DatagramTransport, data: bytes, addr) -> None:
        out = self.respond(data)
        if out is FORWARD:
            if len(self._inflight) >= MAX_INFLIGHT:
                self.drops["forward_busy"] += 1
                out = _servfail(data)
            else:
                task = asyncio.create_task(self._relay(transport, data, addr))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
                return
        if isinstance(out, bytes):
            try:
                transport.sendto(out, addr)
            except OSError as e:
                log.debug("event=dns_send_failed to=%s error=%s", addr, e)

    async def _relay(self, transport: asyncio.DatagramTransport, data: bytes, addr) -> None:
        for host, port in self.forward:
            try:
                reply = await asyncio.wait_for(_udp_query(host, port, data), FORWARD_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                continue
            self.counts["forwarded"] += 1
            if not transport.is_closing():
                transport.sendto(reply, addr)
            return
        self.drops["forward_failed"] += 1
        if not transport.is_closing():
            transport.sendto(_servfail(data), addr)

    # -- packets ------------------------------------------------------------------------
    def respond(self, data: bytes) -> bytes | _Forward | None:
        """The reply to one datagram: bytes, FORWARD, or None (dropped and counted)."""
        if len(data) > MAX_QUERY:
            self.drops["too_large"] += 1
            return None
        try:
            q = DNSRecord.parse(data)
        except Exception:            # dnslib raises DNSError, and on some inputs others: all malformed
            self.drops["malformed"] += 1
            return None
        if q.header.qr:
            self.drops["not_query"] += 1     # a response sent to us: never answer (no reflection loops)
            return None
        self.counts["queries"] += 1
        if q.header.opcode != 0:
            return self._error(q, RCODE.NOTIMP)
        if len(q.questions) != 1:
            return self._error(q, RCODE.FORMERR)
        question = q.questions[0]
        try:
            qname = str(question.qname)
        except Exception:
            self.drops["malformed"] += 1
            return None
        tab = self.table()
        hit = tab.lookup(qname)
        if hit.kind == "outside" or question.qclass != CLASS_IN:
            if self.forward and hit.kind == "outside":
                return FORWARD
            self.counts["refused"] += 1
            return self._error(q, RCODE.REFUSED)
        r = q.reply(ra=1 if self.forward else 0, aa=1)
        if hit.kind == "nxdomain":
            self.counts["nxdomain"] += 1
            r.header.rcode = RCODE.NXDOMAIN
            r.add_auth(self._soa(tab.zone))
            return bytes(r.pack())
        qt = question.qtype
        if qt in (QTYPE.A, QTYPE.ANY):
            for ip in hit.a:
                r.add_answer(RR(question.qname, QTYPE.A, rdata=A(ip), ttl=self.ttl))
        if qt in (QTYPE.AAAA, QTYPE.ANY):
            for ip in hit.aaaa:
                r.add_answer(RR(question.qname, QTYPE.AAAA, rdata=AAAA(ip), ttl=self.ttl))
        if qt in (QTYPE.SOA, QTYPE.ANY) and qname.rstrip(".").lower() == tab.zone:
            r.add_answer(self._soa(tab.zone))
        if r.rr:
            self.counts["answers"] += 1
        else:
            self.counts["nodata"] += 1
            r.add_auth(self._soa(tab.zone))
        return bytes(r.pack())

    def _soa(self, zone: str) -> RR:
        return RR(zone + ".", QTYPE.SOA, ttl=NEGATIVE_TTL,
                  rdata=SOA(f"ns.{zone}.", f"hostmaster.{zone}.", (1, 3600, 600, 86400, NEGATIVE_TTL)))

    def _error(self, q: DNSRecord, rcode: int) -> bytes:
        r = DNSRecord(DNSHeader(id=q.header.id, qr=1, aa=0, ra=1 if self.forward else 0, rd=q.header.rd,
                                opcode=q.header.opcode, rcode=rcode), questions=q.questions[:1])
        return bytes(r.pack())


def _servfail(data: bytes) -> bytes:
    q = DNSRecord.parse(data)
    return bytes(DNSRecord(DNSHeader(id=q.header.id, qr=1, ra=1, rd=q.header.rd, rcode=RCODE.SERVFAIL),
                     questions=q.questions[:1]).pack())


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, responder: DnsResponder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            self.responder._datagram(self.transport, data, addr)
        except Exception:            # one bad datagram must never stop the endpoint
            self.responder.drops["error"] += 1
            log.debug("event=dns_datagram_failed from=%s", addr, exc_info=True)

    def error_received(self, exc: Exception) -> None:
        log.debug("event=dns_socket_error error=%s", exc)


class _OneReply(asyncio.DatagramProtocol):
    def __init__(self, qid: bytes) -> None:
        self.qid = qid
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr) -> None:
        if data[:2] == self.qid and not self.done.done():
            self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def _udp_query(host: str, port: int, data: bytes) -> bytes:
    """Send one query to an upstream from a fresh socket (a random source port) and wait for
    the reply with the same id (the caller bounds the wait)."""
    loop = asyncio.get_running_loop()
    t, p = await loop.create_datagram_endpoint(lambda: _OneReply(data[:2]), remote_addr=(host, port))
    try:
        t.sendto(data)
        return await p.done
    finally:
        t.close()


async def query(host: str, port: int, name: str, qtype: str = "A", timeout: float = 2.0) -> DNSRecord:
    """A stub client's single query (used by the CLI's check and the tests)."""
    q = DNSRecord.question(name, qtype)
    return DNSRecord.parse(await asyncio.wait_for(_udp_query(host, port, q.pack()), timeout))
