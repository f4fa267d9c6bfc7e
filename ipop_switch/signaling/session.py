"""One overlay's signaling session: XMPP connection, discovery, signed messages, the send queue.

The asyncio API the agent uses:
    s = SignalingSession(overlay_identity, SignalingConfig(...))
    await s.start(wait_online=10)          # raises SignalingError on a bad password / untrusted server
    async for ev in s.events(): ...        # PeerAppeared / PeerChanged / PeerRefreshed / PeerLeft /
                                           # PeerMessage / SendFailed / SessionState
    await s.send(peer_node_id, "link_offer", {...})   # returns at once; queued while the peer is unreachable
    fut = s.send_nowait(...)               # the same, with a future of the hand-over to the server
    await s.stop()

The server is a mailbox: a peer exists only after a fresh announcement signed by a key whose
certificate verifies (group CA, dates, CRL, overlay), and every later message from it is checked
against that certificate again (dates and CRL on every use). Whatever fails a check is dropped,
counted under its reason (``drops``) and logged in one line; nothing a peer sends can crash the session.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import logging
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import slixmpp

from ..aio import cancel_and_wait
from ..identity import CertRejected, OverlayIdentity, PeerVerifier, VerifiedPeer
from .config import SignalingConfig
from .discovery import Discovery, MucDiscovery
from .drops import DropCounter
from .events import (Event, PeerAppeared, PeerChanged, PeerLeft, PeerMessage, PeerRefreshed, SendFailed,
                     SessionState)
from .protocol import (ANNOUNCE, NODE_ID_RE, RESERVED, Drop, Envelope, check_outgoing, encode, json_bytes, parse,
                       sign_input)
from .replay import ReplayGuard
from .seal import SealError, info_of, seal, unseal
from .xmpp import AuthFailed, ConnectFailed, SignalingError, TlsFailed, XmppConnection

log = logging.getLogger(__name__)

MAX_CERT_B64 = 4096
MAX_CAPS = 2048
EVENTS_MAX = 10_000


class SendFailedError(SignalingError):
    pass


@dataclass
class PeerRecord:
    peer: VerifiedPeer
    caps: dict[str, Any]
    address: str | None              # where it is reachable now (None while we are offline)
    generation: int                  # our connection number in which it last announced
    last_announce: float             # monotonic
    announces: int = 1
    gone_at: float | None = None     # monotonic time it left the room (reported after leave_grace)


@dataclass
class _Pending:
    node_id: str
    type: str
    payload: dict[str, Any]
    deadline: float
    future: asyncio.Future = field(repr=False)


class SignalingSession:
    def __init__(self, identity: OverlayIdentity, cfg: SignalingConfig, *,
                 verifier: PeerVerifier | None = None, discovery: type = MucDiscovery) -> None:
        self.identity = identity
        self.cfg = cfg
        self.overlay = identity.overlay
        self.node_id = identity.node_id
        self.verifier: PeerVerifier = verifier or identity.verifier
        self.room_jid = cfg.room_jid(self.overlay)
        self._discovery_cls = discovery
        self.drops = DropCounter()
        self.stats: Counter[str] = Counter()
        self.replay = ReplayGuard(cfg.replay_window, max_future=cfg.max_future_skew)
        self._peers: dict[str, PeerRecord] = {}
        self._pending: deque[_Pending] = deque()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._conn: XmppConnection | None = None
        self._disco: Discovery | None = None
        self._announced_to: set[str] = set()
        self._online_since: float | None = None
        self._generation = 0
        self._grace_pending = False
        self._next_recheck = 0.0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._first: asyncio.Future | None = None
        self.last_error = ""
        self._endpoint = cfg.endpoints()[0]
        self._ep_index = 0
        self._attempt = 0                 # connection attempts since we were last online
        self._next_at: float | None = None
        self._rejoin_same = False
        self._repairs = 0                 # split-room repairs in a row (their pause grows)
        self._last_repair = -1e9
        self._repair_after = 0.0
        self.last_repair = ""

    # -- public API ---------------------------------------------------------------------------
    @property
    def online(self) -> bool:
        return self._online_since is not None

    async def start(self, wait_online: float | None = None) -> bool:
        """Start connecting (and reconnecting for as long as the session lives). With
        ``wait_online``, wait that long for the first session: a refused login or an untrusted
        server raises SignalingError; an unreachable server only returns False (retries go on)."""
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._next_recheck = time.monotonic() + self.cfg.recheck_interval
        self._tasks = [asyncio.create_task(self._run(), name=f"signaling-{self.overlay}"),
                       asyncio.create_task(self._housekeeping(), name=f"signaling-house-{self.overlay}")]
        if wait_online is None:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(self._first), wait_online)
        except asyncio.TimeoutError:
            log.warning("signaling %s: not online after %.0fs (%s); still trying", self.overlay, wait_online,
                        self.last_error or "no answer")
            return False
        except SignalingError:
            await self.stop()
            raise
        return True

    async def first_online(self) -> None:
        """Wait for the first login (however long): returns when online; raises SignalingError if
        the first answer was a refused login or an untrusted server certificate."""
        if self._first is not None:
            await asyncio.shield(self._first)

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()
        if self._conn:
            await self._conn.aclose()
        while self._pending:
            self._fail(self._pending.popleft(), "session stopped", emit=False)

    async def events(self) -> AsyncIterator[Event]:
        """The session's events, in order (one consumer)."""
        while True:
            yield await self._events.get()

    def peers(self) -> dict[str, VerifiedPeer]:
        return {nid: r.peer for nid, r in self._peers.items()}

    def peer(self, node_id: str) -> VerifiedPeer | None:
        r = self._peers.get(node_id)
        return r.peer if r else None

    def peer_records(self) -> dict[str, PeerRecord]:
        return dict(self._peers)

    async def send(self, node_id: str, msg_type: str, payload: dict[str, Any]) -> None:
        """Like ``send_nowait`` but returns at once without the future: awaiting it never blocks the
        caller's event handling; a message that cannot be delivered comes back as a SendFailed event."""
        self.send_nowait(node_id, msg_type, payload)

    def send_nowait(self, node_id: str, msg_type: str, payload: dict[str, Any]) -> asyncio.Future:
        """Sign and send ``payload`` to a peer; if it is not reachable now (unknown yet, or we are
        offline), queue it for at most ``queue_timeout`` seconds. The future resolves when the message
        is handed to the server, or fails with SendFailedError (also reported as a SendFailed event).
        Bad arguments raise ValueError at once."""
        if not NODE_ID_RE.match(node_id or ""):
            raise ValueError(f"bad node id {node_id!r}")
        check_outgoing(msg_type, payload)
        if msg_type in RESERVED:
            raise ValueError(f"message type {msg_type!r} is reserved for the session")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # callers may ignore it
        item = _Pending(node_id, msg_type, payload, time.monotonic() + self.cfg.queue_timeout, fut)
        if not self._try_send(item):
            if len(self._pending) >= self.cfg.queue_max:
                self._fail(self._pending.popleft(), "queue full")
            self._pending.append(item)
            self._wake.set()
        return fut

    def local_addresses_changed(self) -> None:
        """The host's addresses changed: reconnect now if ours went away."""
        if self._conn is not None:
            self._conn.check_local_address()

    def status(self) -> dict[str, Any]:
        return {
            "overlay": self.overlay, "node_id": self.node_id, "online": self.online,
            "room": self._disco.describe() if self._disco else self.room_jid,
            "peers": [{"node_id": r.peer.node_id, "subject": r.peer.subject, "fingerprint": r.peer.fingerprint,
                       "caps": r.caps, "reachable": r.address is not None, "announces": r.announces}
                      for r in self._peers.values()],
            "queued": len(self._pending), "drops": self.drops.as_dict(), "stats": dict(self.stats),
            "last_error": self.last_error, "server": "%s:%d" % self._endpoint, "connecting": self.connecting(),
            "room_repairs": self.stats.get("room_repairs", 0), "last_repair": self.last_repair,
        }

    def connecting(self) -> dict[str, Any] | None:
        """While offline: the server being tried or next, the attempt number and seconds to the
        next attempt (None while one runs); None when online."""
        if self.online:
            return None
        next_in = None if self._next_at is None else max(0.0, round(self._next_at - time.monotonic(), 1))
        host, port = self.cfg.endpoints()[self._ep_index]
        return {"server": f"{host}:{port}", "attempt": self._attempt + (1 if next_in is not None else 0),
                "next_in": next_in, "last_error": self.last_error}

    # -- connection loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        """Connect, stay online, reconnect. With several servers (a cluster), a lost or
        unreachable one moves the session to the next at once (``backoff_min``); the back-off
        grows only when a whole round of servers failed."""
        endpoints = self.cfg.endpoints()
        backoff = self.cfg.backoff_min
        tried = 0                       # servers tried since the last success or full round
        while True:
            host, port = self._endpoint = endpoints[self._ep_index]
            conn = XmppConnection(self.cfg, self._on_element, (host, port))
            self._conn = conn
            online_at = None
            self._rejoin_same = False
            try:
                self.stats["connect_attempts"] += 1
                self._attempt += 1
                self._next_at = None
                await conn.connect()
                self._generation += 1
                self._announced_to.clear()
                self._disco = self._discovery_cls(self.room_jid, self.node_id)
                await self._disco.start(conn, self._contact_seen, self._contact_gone)
                online_at = self._online_since = time.monotonic()
                self._attempt = 0
                self._grace_pending = self._generation > 1 or bool(self._peers)
                self.last_error = ""
                log.info("signaling %s: online as %s on %s:%d in %s", self.overlay, conn.jid, host, port,
                         self._disco.describe())
                self._emit(SessionState(True, self._disco.describe()))
                if self._first and not self._first.done():
                    self._first.set_result(True)
                self._wake.set()
                self._flush_all()
                watch = asyncio.ensure_future(self._room_watch(conn, self._disco))
                try:
                    reason = await conn.disconnected
                finally:
                    watch.cancel()
                self.last_error = f"session lost: {reason}"
                log.warning("signaling %s: XMPP session with %s:%d lost (%s); reconnecting", self.overlay, host, port,
                            reason)
            except (AuthFailed, TlsFailed) as e:
                self.last_error = str(e)
                log.error("signaling %s: %s", self.overlay, e)
                if self._first and not self._first.done():
                    self._first.set_exception(e)
                    return
                backoff = self.cfg.backoff_max      # configuration trouble: retry, but rarely
            except ConnectFailed as e:
                self.last_error = str(e)
            except asyncio.TimeoutError:
                self.last_error = f"no answer from room {self.room_jid}"
            except asyncio.CancelledError:
                conn.close()
                raise
            except Exception as e:  # a library surprise must cost a reconnect, not the session
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("signaling %s: unexpected error; reconnecting", self.overlay)
            finally:
                conn.close()
                self._went_offline()
            if online_at is not None and time.monotonic() - online_at > 10:
                backoff, tried = self.cfg.backoff_min, 0
            if self._rejoin_same:               # a split room: the same server, a fresh join
                delay = self.cfg.backoff_min
            else:
                tried += 1
                if tried < len(endpoints):      # another server of the cluster may answer now
                    delay = self.cfg.backoff_min
                else:
                    delay, tried = backoff, 0
                    backoff = min(self.cfg.backoff_max, backoff * 2)
                self._ep_index = (self._ep_index + 1) % len(endpoints)
            delay *= random.uniform(0.75, 1.25)
            self._next_at = time.monotonic() + delay
            if online_at is None:
                nh, np_ = endpoints[self._ep_index]
                log.warning("signaling %s: %s (attempt %d); next: %s:%d in %.1fs", self.overlay, self.last_error,
                            self._attempt, nh, np_, delay)
            await asyncio.sleep(delay)
            self.stats["reconnects"] += 1

    async def _room_watch(self, conn: XmppConnection, disco: Discovery) -> None:
        """Now and then, ask the server who is in the room and compare with the presences we
        got. Two cluster nodes that each created the room (agents joining at once through
        both) leave the overlay split for good; the server then routes to one room while we
        sit in the other. Repair: drop the connection and join again (it lands in the room
        the server routes to), with a growing pause between repairs."""
        check = getattr(disco, "check", None)
        if check is None or self.cfg.room_check <= 0:
            return
        # the first look soon after the join, then every room_check (an iterator: a tuple of the
        # delays, as once written here, held 80 MB for the life of the session)
        for delay in itertools.chain((3.0,), itertools.repeat(self.cfg.room_check)):
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            try:
                reason = await check(conn)
            except asyncio.CancelledError:
                raise
            except Exception as e:            # no answer, an error reply: nothing to conclude
                log.info("signaling %s: room check failed: %s: %s", self.overlay, type(e).__name__, e)
                continue
            if not reason:
                continue
            now = time.monotonic()
            if now < self._repair_after:
                log.info("signaling %s: room looks split (%s); next repair allowed in %.0fs", self.overlay, reason,
                         self._repair_after - now)
                continue
            self._repairs = self._repairs + 1 if now - self._last_repair < 600 else 1
            self._last_repair = now
            self._repair_after = now + min(300.0, 5.0 * 2 ** (self._repairs - 1))
            self.stats["room_repairs"] += 1
            self.last_repair = reason
            log.warning("signaling %s: split room (%s): joining again", self.overlay, reason)
            self._rejoin_same = True
            conn.close()
            return

    def _went_offline(self) -> None:
        was = self.online
        self._online_since = None
        self._disco = None
        for r in self._peers.values():
            r.address = None
            r.gone_at = None  # a server going away empties the room: the rejoin grace decides, not this
        if was:
            self._emit(SessionState(False, self.last_error))

    # -- discovery callbacks --------------------------------------------------------------------
    def _contact_seen(self, address: str, hint: str | None) -> None:
        if hint and hint != self.node_id and address not in self._announced_to:
            self._announce(address, hint)

    def _contact_gone(self, address: str) -> None:
        """A peer left the room. Reported only after ``leave_grace``: when the server shuts down it
        empties the room just before dropping us too, and peers that merely reconnect come back."""
        self._announced_to.discard(address)  # back later (a roster contact keeps its address): announce again
        for r in self._peers.values():
            if r.address == address:
                r.address, r.gone_at = None, time.monotonic()
                self._wake.set()

    def _announce(self, address: str, to_node: str) -> None:
        self._announced_to.add(address)
        # the addresses bind the announce to this pair of room occupants: another occupant cannot
        # forward it to divert the recipient's messages for us to itself
        body = {"cert": base64.b64encode(self.identity.cert_der).decode(), "caps": self.cfg.capabilities,
                "from_addr": self._disco.own_address if self._disco else "", "to_addr": address}
        try:
            self._transmit(address, to_node, ANNOUNCE, body)
        except Exception as e:
            log.warning("signaling %s: announce to %s failed: %s", self.overlay, address, e)

    def _transmit(self, address: str, to_node: str, msg_type: str, body: dict) -> None:
        if self._conn is None or not self._conn.client.transport:
            raise ConnectionError("not connected")
        if msg_type != ANNOUNCE:
            # end to end to the peer's certified tunnel key: the server relays, never reads
            rec = self._peers[to_node]
            body = seal(json_bytes(body), rec.peer.tunnel_public, info_of(self.overlay, self.node_id, to_node, msg_type))
        text, sig = encode(Envelope(self.overlay, self.node_id, to_node, msg_type, body), self.identity.sign)
        self._conn.send_element(address, text, sig)
        self.stats["sent"] += 1

    # -- receiving --------------------------------------------------------------------------------
    def _on_element(self, source: slixmpp.JID, text: str | None, sig: str | None) -> None:
        disco = self._disco
        address = disco.address_of(source) if disco else None
        try:
            if address is None:
                raise Drop("foreign_source", "not a contact of this overlay")
            self._receive(address, text, sig)
        except Drop as d:
            self.drops.add(d.reason, d.detail, str(source))
        except Exception as e:
            self.drops.add("internal_error", f"{type(e).__name__}: {e}", str(source))
            log.debug("internal error on a received message", exc_info=True)

    def _receive(self, address: str, text: str | None, sig: str | None) -> None:
        env, raw, signature = parse(text, sig)
        if env.overlay != self.overlay:
            raise Drop("wrong_overlay", f"for overlay {env.overlay!r}")
        if env.recipient != self.node_id:
            raise Drop("wrong_recipient", f"for {env.recipient}")
        if env.sender == self.node_id:
            raise Drop("wrong_sender", "claims to be us")
        reason = self.replay.check(env.sender, env.nonce, env.ts_ms)
        if reason:
            raise Drop(reason, f"from {env.sender}")
        caps: dict[str, Any] = {}
        if env.type == ANNOUNCE:
            peer, caps = self._announce_peer(env)
            if self._disco is None or self._disco.hint(address) != env.sender:
                raise Drop("sender_mismatch", f"announce of {env.sender} from address {address}")
            if env.body.get("from_addr") != address or env.body.get("to_addr") != self._disco.own_address:
                raise Drop("wrong_address", f"announce of {env.sender} meant for another pair of addresses")
        else:
            rec = self._peers.get(env.sender)
            if rec is None:
                raise Drop("unknown_sender", f"{env.sender} has not announced itself")
            try:
                peer = self.verifier.verify(rec.peer.cert_der)
            except CertRejected as e:
                self._forget(env.sender, e.reason)
                raise Drop(e.reason, e.detail) from None
        if not peer.verify_signature(signature, sign_input(raw)):
            raise Drop("bad_signature", f"claims {env.sender}")
        vet = getattr(self._disco, "vet", None) if env.type == ANNOUNCE else None
        if vet is not None:  # a discovery with its own trust (SocialVPN: friends only, pinned keys)
            refused = vet(address, peer)
            if refused:
                raise Drop(refused, f"announce of {env.sender} from {address}")
        body = env.body
        if env.type != ANNOUNCE:
            try:
                body = json.loads(unseal(env.body, self.identity.node.tunnel_key,
                                         info_of(self.overlay, env.sender, self.node_id, env.type)))
            except SealError as e:
                raise Drop("bad_seal", f"from {env.sender}: {e}") from None
            except ValueError:
                raise Drop("malformed", f"sealed body of {env.sender} is not JSON") from None
            if not isinstance(body, dict):
                raise Drop("malformed", f"sealed body of {env.sender} is not an object")
        self.replay.commit(env.sender, env.nonce, env.ts_ms)
        self.stats["received"] += 1
        if env.type == ANNOUNCE:
            self._on_announce(address, peer, caps)
        else:
            self._emit(PeerMessage(env.sender, env.type, body))

    def _announce_peer(self, env: Envelope) -> tuple[VerifiedPeer, dict[str, Any]]:
        cert_b64, caps = env.body.get("cert"), env.body.get("caps", {})
        if not isinstance(cert_b64, str) or len(cert_b64) > MAX_CERT_B64 or not isinstance(caps, dict):
            raise Drop("malformed", "announce body")
        try:
            der = base64.b64decode(cert_b64, validate=True)
        except (binascii.Error, ValueError):
            raise Drop("malformed", "announce certificate encoding") from None
        try:
            peer = self.verifier.verify(der)
        except CertRejected as e:
            raise Drop(e.reason, e.detail) from None
        if peer.node_id != env.sender:
            raise Drop("sender_mismatch", f"certificate of {peer.node_id} in a message from {env.sender}")
        return peer, caps

    def _on_announce(self, address: str, peer: VerifiedPeer, caps: dict[str, Any]) -> None:
        now = time.monotonic()
        rec = self._peers.get(peer.node_id)
        if rec is None:
            self._peers[peer.node_id] = PeerRecord(peer, caps, address, self._generation, now)
            log.info("signaling %s: peer %s appeared (%s, %s)", self.overlay, peer.node_id, peer.subject,
                     peer.fingerprint)
            self._emit(PeerAppeared(peer, caps))
        else:
            changed = rec.peer.cert_der != peer.cert_der or rec.caps != caps
            rec.peer, rec.caps, rec.address, rec.generation, rec.last_announce = peer, caps, address, self._generation, now
            rec.gone_at = None
            rec.announces += 1
            self._emit(PeerChanged(peer, caps) if changed else PeerRefreshed(peer))
        if address not in self._announced_to:  # it saw us before we saw it: answer
            self._announce(address, peer.node_id)
        self._flush(peer.node_id)

    def _forget(self, node_id: str, reason: str) -> None:
        if self._peers.pop(node_id, None) is not None:
            log.info("signaling %s: peer %s left (%s)", self.overlay, node_id, reason)
            self._emit(PeerLeft(node_id, reason))

    # -- send queue -------------------------------------------------------------------------------
    def _try_send(self, item: _Pending) -> bool:
        rec = self._peers.get(item.node_id)
        if not self.online or rec is None or rec.address is None:
            return False
        try:
            self._transmit(rec.address, item.node_id, item.type, item.payload)
        except Exception as e:
            log.debug("send to %s deferred: %s", item.node_id, e)
            return False
        if not item.future.done():
            item.future.set_result(None)
        return True

    def _flush(self, node_id: str) -> None:
        if not any(p.node_id == node_id for p in self._pending):
            return
        keep: deque[_Pending] = deque()
        for p in self._pending:
            if p.node_id != node_id or not self._try_send(p):
                keep.append(p)
        self._pending = keep

    def _flush_all(self) -> None:
        for nid in {p.node_id for p in self._pending}:
            self._flush(nid)

    def _fail(self, item: _Pending, reason: str, *, emit: bool = True) -> None:
        if not item.future.done():
            item.future.set_exception(SendFailedError(f"message {item.type} to {item.node_id} not sent: {reason}"))
        self.stats["send_failed"] += 1
        if emit:
            log.warning("signaling %s: %s to %s not sent: %s", self.overlay, item.type, item.node_id, reason)
            self._emit(SendFailed(item.node_id, item.type, reason))

    # -- timers -----------------------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        """Queue deadlines, the rediscovery grace after a reconnect, periodic certificate re-checks.
        Sleeps until the next of them (no polling)."""
        while True:
            now = time.monotonic()
            while self._pending and self._pending[0].deadline <= now:
                self._fail(self._pending.popleft(), f"peer not reachable within {self.cfg.queue_timeout:.0f}s")
            if self._grace_pending and self._online_since is not None and \
                    now - self._online_since >= self.cfg.rejoin_grace:
                self._grace_pending = False
                for nid, r in list(self._peers.items()):
                    if r.generation < self._generation:
                        self._forget(nid, "not rediscovered")
            if self.online:
                for nid, r in list(self._peers.items()):
                    if r.gone_at is not None and now - r.gone_at >= self.cfg.leave_grace:
                        self._forget(nid, "left")
            if now >= self._next_recheck:
                self._next_recheck = now + self.cfg.recheck_interval
                self._recheck()
            wake = [self._next_recheck]
            if self._pending:
                wake.append(self._pending[0].deadline)
            if self._grace_pending and self._online_since is not None:
                wake.append(self._online_since + self.cfg.rejoin_grace)
            wake += [r.gone_at + self.cfg.leave_grace for r in self._peers.values() if r.gone_at is not None]
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.01, min(wake) - time.monotonic()))
            except asyncio.TimeoutError:
                pass

    def _recheck(self) -> None:
        for nid, r in list(self._peers.items()):
            try:
                self.verifier.verify(r.peer.cert_der)
            except CertRejected as e:
                self._forget(nid, e.reason)

    def _emit(self, ev: Event) -> None:
        if self._events.qsize() >= EVENTS_MAX:
            self._events.get_nowait()
            self.stats["events_lost"] += 1
        self._events.put_nowait(ev)
