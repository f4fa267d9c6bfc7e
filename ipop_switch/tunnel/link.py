"""One peer link's lifecycle: the state machine that runs ICE attempts, brings the link
up, keeps it alive and ends it. What it drives lives beside it: ice.py (ICE and the
sockets), keys.py (handshakes and rekeys), datapath.py (the frames), tap.py (the TAP).

State machine (docs/tunnel.md, "Link states"), every wait bounded by a Timers value:

    controlling: GATHERING -> OFFERED -> CHECKING -> HANDSHAKE -> UP
    controlled:  WAIT_OFFER -> GATHERING -> CHECKING -> HANDSHAKE -> UP
    any failure or a dead path: the attempt ends (ICE closed, sessions dropped,
    "down" reported if it was up) -> BACKOFF (0.5 s doubling to 2 s, jittered) -> again.

The controlling node (higher node id) starts every attempt (link_offer) and is
always the handshake initiator; the controlled node answers, and asks for a new
attempt with link_restart when it starts or loses the path. Attempts are numbered
by the controlling side's clock in ms, so a restarted worker's attempts are newer.
The TAP lives as long as the worker: the agent adds it to the bridge on "up",
removes the port on "down" and before closing the link.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from typing import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import codec, predict
from .datapath import Datapath
from .ice import (DEFAULT_EXCLUDE, TURN_CHANNEL_REFRESH, IceConfig, IceSession, Path, host_addresses,
                  install_hook, predicted_path, reply, same_addr, set_side_handler)
from .keys import Keys
from .messages import LinkSpec
from .session import Session
from .stats import Stats
from .tap import Tap
from .timers import DEAD, PING, Timers, jitter, keepalive_due
from .wheel import Timer, wheel

log = logging.getLogger(__name__)

Emit = Callable[[dict], None]

PREGATHER_FRESH = 10.0      # s: candidates gathered before the offer are used at most this old


def _retrieve(task: asyncio.Task) -> None:
    """A gathering nobody awaits any more (dropped, or the attempt timed out): its error is
    read here so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


class State(enum.Enum):
    NEW = "new"
    WAIT_OFFER = "wait_offer"
    GATHERING = "gathering"
    OFFERED = "offered"
    CHECKING = "checking"
    HANDSHAKE = "handshake"
    UP = "up"
    BACKOFF = "backoff"
    CLOSED = "closed"


class AttemptEnded(Exception):
    """An attempt is over (timeout, ICE failure, dead path); the message says why."""


class LinkWorker:
    def __init__(self, spec: LinkSpec, emit: Emit) -> None:
        self.spec = spec
        self.timers = Timers.from_dict(spec.timers)
        self._emit = emit
        self.state = State.NEW
        self.attempt = 0
        self.stats = Stats()
        self.tap = Tap(spec.tap, spec.mtu)
        self.dp: Datapath | None = None
        self.keys: Keys | None = None
        self.ice: IceSession | None = None
        self.probe: IceSession | None = None
        self.path: Path | None = None
        self.up_since = 0.0
        self.closed = False
        self._run_task: asyncio.Task | None = None
        self._attempt_task: asyncio.Task | None = None
        self._superseded = False
        self._wake = asyncio.Event()
        self._offer: dict | None = None
        self._offer_event = asyncio.Event()
        self._answer: asyncio.Future | None = None
        self._confirmed = asyncio.Event()
        self._last_offer_payload: dict | None = None
        # controlled side: an ICE session gathering while the offer is on its way (its task,
        # when it started), taken by the next attempt if still fresh
        self._pre: tuple[IceSession, asyncio.Task, float] | None = None
        self._tasks: set[asyncio.Task] = set()
        # upgrade of a relayed path: a direct-only ICE probe beside the working relay
        self._probe_task: asyncio.Task | None = None
        self._probe_answer: asyncio.Future | None = None
        self._last_probe = 0.0
        self._probe_every = jitter(self.timers.upgrade_interval)
        self.upgrades = 0
        self._retired: set[IceSession] = set()   # old relayed sessions still receiving (path_linger)
        # port prediction beside a relayed path (predict.py): the run, its task, what it found
        self._predict: predict.Prediction | None = None
        self._predict_task: asyncio.Task | None = None
        self.prediction: dict = {}
        # the host's addresses: compared when the pool's netlink watch says they changed, or
        # every addr_poll seconds where there is no watch
        self.poll_addresses = True
        self._closing: set[asyncio.Future] = set()   # ICE sessions of ended attempts, closing
        self._addr_changed = False
        self._addrs: set[str] = set()
        self._last_addr = 0.0
        # while up: the link's one entry on the process's timer wheel, and the future _check
        # ends the attempt with (docs/tunnel.md, "Keepalives and timers")
        self._timer: Timer | None = None
        self._up_done: asyncio.Future | None = None
        self._last_ping = 0.0
        # idle pings of the many links of a node spread out, always below idle_keepalive
        self._idle_every = self.timers.idle_keepalive * (0.85 + 0.15 * random.random())

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self.tap.open()
        self.dp = Datapath(self.tap.fd, self.stats, self._on_control, self._on_handshake_packet,
                           tap=self.tap, bridge_tso=self.spec.bridge_tso, offload=self.spec.offload)
        self.dp.set_on_confirm(self._on_confirm)
        self.dp.tx.max_frame = self.spec.mtu + 18
        static = X25519PrivateKey.from_private_bytes(bytes(self.spec.local_static))
        self.keys = Keys(static, bytes(self.spec.peer_static), self.spec.link_id, self.timers,
                         self.stats, self.dp.table)
        asyncio.get_running_loop().add_reader(self.tap.fd, self.dp.tap_readable)
        self._run_task = asyncio.create_task(self._run(), name=f"link-{self.spec.link_id}")

    async def close(self, reason: str = "closed", notify_peer: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if notify_peer:
            self._signal("link_close", {"attempt": self.attempt, "reason": reason})
        for t in [self._run_task, self._attempt_task, *self._tasks]:
            if t and not t.done():
                t.cancel()
        for t in [self._run_task, self._attempt_task]:
            if t:
                try:
                    await asyncio.wait_for(asyncio.shield(t), 3.0)
                except BaseException:
                    pass
        await self._end_attempt(reason)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=5)
        if self.tap.fd >= 0:
            try:
                asyncio.get_running_loop().remove_reader(self.tap.fd)
            except Exception:
                pass
        self.tap.close()
        self.state = State.CLOSED
        self._emit({"kind": "closed", "link_id": self.spec.link_id, "tap": self.spec.tap})

    # -- signaling from the agent ---------------------------------------------------
    def on_signal(self, type_: str, payload: dict) -> None:
        """A message from the peer's worker (relayed by the agents). Bad ones are counted."""
        if not isinstance(payload, dict):
            self.stats.drops["signal_bad"] += 1
            return
        attempt = payload.get("attempt")
        if not isinstance(attempt, int):
            self.stats.drops["signal_bad"] += 1
            return
        if type_ == "link_offer" and not self.spec.controlling:
            if attempt <= self.attempt:
                self.stats.drops["signal_stale"] += 1
                return
            self._offer = payload
            self._offer_event.set()
            if self._attempt_task and not self._attempt_task.done():
                self._superseded = True
                self._attempt_task.cancel()
            self._wake.set()
        elif type_ == "link_answer" and self.spec.controlling:
            if attempt != self.attempt or self._answer is None or self._answer.done():
                self.stats.drops["signal_stale"] += 1
                return
            self._answer.set_result(payload)
        elif type_ == "link_restart" and self.spec.controlling:
            if self.state == State.OFFERED and self._last_offer_payload:
                self._signal("link_offer", self._last_offer_payload)      # it may have missed it
            elif self.state in (State.UP, State.CHECKING, State.HANDSHAKE):
                # the controlled side asks only once its attempt has ended (its address changed,
                # its worker restarted, ...): believe it, even while our side still looks fine
                self._supersede()
            else:
                self._wake.set()
        elif type_ == "link_probe" and not self.spec.controlling:
            if attempt != self.attempt or self.state != State.UP or self._probe_task is not None:
                self.stats.drops["signal_stale"] += 1
                return
            self._probe_task = self._spawn(self._probe_controlled(payload))
        elif type_ == "link_probe_answer" and self.spec.controlling:
            if attempt != self.attempt or self._probe_answer is None or self._probe_answer.done():
                self.stats.drops["signal_stale"] += 1
                return
            self._probe_answer.set_result(payload)
        elif type_ == "link_close":
            if attempt == self.attempt and self.state not in (State.BACKOFF, State.WAIT_OFFER):
                self._supersede(keep_backoff=True)
        else:
            self.stats.drops["signal_unexpected"] += 1

    def addresses_changed(self) -> None:
        """The host's addresses changed (netwatch): an up link compares its own at once and
        restarts ICE if one it uses is gone."""
        self._addr_changed = True
        self._check_soon()

    def rekey_now(self) -> bool:
        """Start a rekey at once (initiator only): used by tests and operators."""
        if not self.spec.controlling or self.state != State.UP or self.keys.handshaking:  # type: ignore[union-attr]
            return False
        self.keys.start()  # type: ignore[union-attr]
        self._check_soon()                  # the initiation goes out from the next look
        return True

    # -- the supervisor -------------------------------------------------------------
    async def _run(self) -> None:
        backoff = self.timers.backoff_min
        while not self.closed:
            if not self.spec.controlling:
                self._pregather()
                offer = await self._wait_offer()
                coro = self._attempt_controlled(offer)
            else:
                coro = self._attempt_controlling()
            self._superseded = False
            self._attempt_task = asyncio.create_task(coro)
            reached_up = False
            try:
                await self._attempt_task
                reason = "ended"
            except asyncio.CancelledError:
                if self.closed:
                    raise
                reason = "superseded"
            except AttemptEnded as e:
                reason = str(e)
            except Exception as e:                      # aioice and OS errors end the attempt, not us
                reason = f"{type(e).__name__}: {e}"
            reached_up = self.up_since > 0
            log.info("link %s attempt %d ended: %s", self.spec.link_id, self.attempt, reason)
            superseded = self._superseded
            await self._end_attempt(reason)
            if reached_up:
                backoff = self.timers.backoff_min
            if superseded and not getattr(self, "_keep_backoff", False):
                continue
            self._keep_backoff = False
            self.state = State.BACKOFF
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), jitter(backoff))
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, self.timers.backoff_max)

    def _supersede(self, keep_backoff: bool = False) -> None:
        if self._attempt_task and not self._attempt_task.done():
            self._superseded = True
            self._keep_backoff = keep_backoff
            self._attempt_task.cancel()

    def _pregather(self) -> None:
        """Controlled side: gather while the peer gathers and sends its offer, instead of after
        it: the two gatherings overlap (a UDP-blocked host's STUN timeout, ~3 s, no longer
        comes after the peer's). Taken by the attempt the offer starts if it is at most
        ``PREGATHER_FRESH`` old; dropped when older (addresses or the TURN server may have
        changed meanwhile, and an idle allocation is not held for a peer that stays away)."""
        if self._pre is not None or self.closed:
            return
        ice = self._new_ice(0)
        task = asyncio.ensure_future(ice.gather())
        task.add_done_callback(_retrieve)
        self._pre = (ice, task, time.monotonic())

    def _pre_fresh(self) -> bool:
        return self._pre is not None and time.monotonic() - self._pre[2] <= PREGATHER_FRESH

    def _drop_pre(self) -> None:
        pre, self._pre = self._pre, None
        if pre is not None:
            pre[1].cancel()
            self._close_later(pre[0])

    def _close_later(self, s: IceSession) -> None:
        t = asyncio.ensure_future(s.close())
        self._closing.add(t)
        t.add_done_callback(self._closing.discard)

    def _host_addrs(self) -> set[str]:
        """The host's addresses ICE may gather now (the overlay's own TAP left out)."""
        return set(host_addresses(list(DEFAULT_EXCLUDE) + list(self.spec.exclude_interfaces) + [self.spec.tap],
                                  self.spec.ipv6))

    async def _wait_offer(self) -> dict:
        """Controlled side: ask for an attempt (link_restart) and wait for a newer offer."""
        self.state = State.WAIT_OFFER
        while True:
            if not self._pre_fresh():
                self._drop_pre()
            if self._offer is not None and self._offer["attempt"] > self.attempt:
                offer, self._offer = self._offer, None
                return offer
            self._offer = None
            self._offer_event.clear()
            self._signal("link_restart", {"attempt": self.attempt, "reason": "need offer"})
            try:
                await asyncio.wait_for(self._offer_event.wait(), jitter(self.timers.restart_every))
            except asyncio.TimeoutError:
                pass

    def _ice_config(self, direct_only: bool = False) -> IceConfig:
        t = self.spec.turn
        return IceConfig(
            stun=tuple(self.spec.stun) if self.spec.stun else None,
            turn=(t.host, t.port) if t else None, turn_user=t.user if t else None,
            turn_password=t.password if t else None, turn_transport=t.transport if t else "udp",
            exclude=list(self.spec.exclude_interfaces) + [self.spec.tap], use_ipv6=self.spec.ipv6,
            relay_delay=self.timers.relay_delay, direct_only=direct_only)

    def _new_ice(self, attempt: int, direct_only: bool = False) -> IceSession:
        return IceSession(self._ice_config(direct_only), self.spec.controlling, attempt,
                          self.dp.receive, self._on_stray)  # type: ignore[union-attr]

    async def _attempt_controlling(self) -> None:
        t = self.timers
        self.attempt = max(int(time.time() * 1000), self.attempt + 1)
        self.state = State.GATHERING
        self.ice = ice = self._new_ice(self.attempt)
        local = await self._bounded(ice.gather(), t.gather_timeout, "gathering")
        loop = asyncio.get_running_loop()
        self._answer = loop.create_future()
        self.state = State.OFFERED
        self._last_offer_payload = {"attempt": self.attempt, **local, "hints": {"mtu": self.spec.mtu, **self.dp.local_hints()}}  # type: ignore[union-attr]
        self._signal("link_offer", self._last_offer_payload)
        answer = await self._bounded(self._answer, t.answer_timeout, "link_answer")
        await self._connect(ice, answer)
        keys = self.keys
        assert keys is not None and self.dp is not None
        keys.set_prologue(ice.ufrag, ice.remote_ufrag)
        self.state = State.HANDSHAKE
        keys.start()
        deadline = time.monotonic() + t.handshake_timeout
        while self.dp.current is None:
            if time.monotonic() > deadline:
                raise AttemptEnded(f"handshake: no response within {t.handshake_timeout:.0f}s")
            keys.tick(self.dp.send)
            await asyncio.sleep(0.05)
        await self._up()

    async def _attempt_controlled(self, offer: dict) -> None:
        t = self.timers
        self.attempt = offer["attempt"]
        self.state = State.GATHERING
        local = None
        if self._pre_fresh():
            (ice, gathering, _), self._pre = self._pre, None  # type: ignore[misc]
            self.ice = ice
            ice.attempt = self.attempt
            local = await self._bounded(gathering, t.gather_timeout, "gathering")
            if not ice.local_addresses() <= self._host_addrs():   # one of its addresses is gone
                self._close_later(ice)
                local = None
        else:
            self._drop_pre()
        if local is None:
            self.ice = ice = self._new_ice(self.attempt)
            local = await self._bounded(ice.gather(), t.gather_timeout, "gathering")
        self.keys.set_prologue(offer.get("ufrag", ""), ice.ufrag)  # type: ignore[union-attr]
        self._confirmed.clear()
        self._signal("link_answer", {"attempt": self.attempt, **local, "hints": self.dp.local_hints()})  # type: ignore[union-attr]
        await self._connect(ice, offer)
        self.state = State.HANDSHAKE
        await self._bounded(self._confirmed.wait(), t.handshake_timeout, "handshake")
        await self._up()

    async def _connect(self, ice: IceSession, remote: dict) -> None:
        try:
            n = await ice.set_remote(remote.get("ufrag"), remote.get("pwd"), remote.get("candidates"))
            self.dp.set_peer_hints(remote.get("hints"))  # type: ignore[union-attr]
        except ValueError as e:
            raise AttemptEnded(f"bad remote description: {e}") from None
        if n == 0:
            raise AttemptEnded("peer sent no usable candidates")
        self.state = State.CHECKING
        path = await self._bounded(ice.connect(), self.timers.checks_timeout, "ICE checks")
        ice.stop_consent()                  # the link's keepalives are the consent (docs/tunnel.md §5)
        self._use_path(path)

    def _use_path(self, path: Path) -> None:
        self.path = path
        self.dp.use_path(path)  # type: ignore[union-attr]
        self._channel_refreshed = time.monotonic()

    async def _bounded(self, aw, timeout: float, what: str):
        try:
            return await asyncio.wait_for(aw, timeout)
        except asyncio.TimeoutError:
            raise AttemptEnded(f"{what}: timed out after {timeout:.0f}s") from None
        except ConnectionError as e:
            raise AttemptEnded(f"{what}: {e}") from None

    async def _up(self) -> None:
        """UP until the path dies. Nothing ticks: ``_check`` runs on the process's timer wheel
        at the link's next deadline (keepalive, dead path, rekey, handshake retry, expiry of
        the replaced session, TURN channel refresh, upgrade probe, address poll), and sooner
        when a send starts waiting for an answer (``Stats.kick``) or an event moves a deadline."""
        st = self.stats
        self.state = State.UP
        self.up_since = time.monotonic()
        st.last_rx = max(st.last_rx, self.up_since)
        st.tx_wait = 0.0
        self._last_ping = 0.0
        self._emit({"kind": "up", "link_id": self.spec.link_id, "peer_id": self.spec.peer_id,
                    "tap": self.spec.tap, "attempt": self.attempt, **self.path.describe()})  # type: ignore[union-attr]
        self._last_probe = self._last_addr = time.monotonic()   # the first direct probe one interval after up
        if self.path is not None and self.path.kind == "relay" and self.spec.port_prediction:
            self._predict_task = self._spawn(self._run_prediction(self.attempt))
        self._addrs = self.ice.local_addresses() if self.ice else set()
        self._up_done = done = asyncio.get_running_loop().create_future()
        st.check_within = self.timers.keepalive
        st.kick = self._kick
        try:
            # one ping at once: status has an RTT as soon as the link is up (the next ones
            # only when traffic or the NAT refresh asks for them)
            self._ping(time.monotonic())
            self._check()
            await done
        finally:
            self._up_done = None
            st.kick = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = wheel().call_at(at, self._check)
        self.stats.check_at = at

    def _kick(self, now: float) -> None:
        """A send started waiting for an answer: look again within ``keepalive``."""
        if self._up_done is not None:
            self._arm(now + self.timers.keepalive)

    def _check_soon(self) -> None:
        """Something moved a deadline (a new session, an address change): look at once."""
        if self._up_done is not None:
            self._arm(time.monotonic())

    def _check(self) -> None:
        """One look at an up link (from the wheel): act on what is due, arm the next look."""
        self._timer = None
        done = self._up_done
        if done is None or done.done():
            return
        try:
            at = self._due(time.monotonic())
        except AttemptEnded as e:
            done.set_exception(e)
            return
        except Exception as e:                  # as the old loop: an error ends the attempt, not us
            done.set_exception(AttemptEnded(f"{type(e).__name__}: {e}"))
            return
        self._arm(at)

    def _due(self, now: float) -> float:
        """Do what is due at ``now``; returns when the link must be looked at next."""
        t, keys, dp, st = self.timers, self.keys, self.dp, self.stats
        assert keys is not None and dp is not None
        at: list[float] = []
        cur = dp.current
        if cur is not None:
            if now - cur.created >= t.reject_after:
                raise AttemptEnded("session expired without a rekey")
            at.append(cur.created + t.reject_after)
        if self.spec.controlling:
            if not keys.handshaking and cur is not None and now - cur.created >= t.rekey_after:
                keys.start()
            keys.tick(dp.send)
            if keys.handshaking:
                at.append(keys.next_retry)
            elif cur is not None:
                at.append(cur.created + t.rekey_after)
            self._maybe_probe(now)
            if self.path is not None and self.path.kind == "relay" and self._probe_task is None:
                at.append(self._last_probe + self._probe_every)
        dp.table.expire(now)
        if dp.table.previous is not None:
            at.append(dp.table.previous_until)
        if self.path and self.path.turn_inner is not None:
            if now - self._channel_refreshed >= TURN_CHANNEL_REFRESH:
                self._channel_refreshed = now
                self._spawn(self._refresh_channel(self.path))
            at.append(self._channel_refreshed + TURN_CHANNEL_REFRESH)
        if self._addr_changed or (self.poll_addresses and now - self._last_addr >= t.addr_poll):
            self._last_addr, self._addr_changed = now, False
            if self._addrs and not self._addrs <= self._host_addrs():
                raise AttemptEnded("local addresses changed: ICE restart")
        if self.poll_addresses:                  # only where the process has no netlink watch
            at.append(self._last_addr + t.addr_poll)
        due = keepalive_due(now, last_rx=st.last_rx, last_tx=st.last_tx, last_data_tx=st.last_data_tx,
                            tx_wait=st.tx_wait, last_ping=self._last_ping, t=t, idle_every=self._idle_every)
        if due.action == DEAD:
            raise AttemptEnded(due.why)
        if due.action == PING:
            self._ping(now)
        at.append(due.at)
        return min(at)

    def _ping(self, now: float) -> None:
        """A ping (answered by a pong: liveness, RTT); it waits for an answer like data does."""
        self._last_ping = now
        st = self.stats
        if self.dp.send_control(bytes([codec.CTRL_PING]) + time.monotonic_ns().to_bytes(8, "big")):  # type: ignore[union-attr]
            st.pings += 1
        if st.tx_wait <= st.last_rx:
            st.tx_wait = now

    async def _refresh_channel(self, path: Path) -> None:
        try:
            await asyncio.wait_for(path.refresh_channel(), 10)
        except Exception as e:
            log.info("link %s: TURN channel refresh failed: %s", self.spec.link_id, e)

    async def _end_attempt(self, reason: str) -> None:
        if self._probe_task is not None and not self._probe_task.done():
            self._probe_task.cancel()
        if self._predict_task is not None and not self._predict_task.done():
            self._predict_task.cancel()
        if self._predict is not None:
            self._predict.close_all()
        self._predict_task = self._predict = None
        self._probe_task = self._probe_answer = None
        was_up = self.up_since > 0
        self.up_since = 0.0
        if self.dp:
            self.dp.detach()
        if self.keys:
            self.keys.reset()
        self.path = None
        self._answer = None
        if was_up:      # first: closing ICE may wait on a dead TURN server
            self._emit({"kind": "down", "link_id": self.spec.link_id, "peer_id": self.spec.peer_id,
                        "tap": self.spec.tap, "reason": reason})
        ices, self.ice, self.probe = (self.ice, self.probe, *self._retired), None, None
        self._retired.clear()
        self._drop_pre()
        # closed in the background: closing a TURN allocation from an address that is gone (the
        # host roamed) or towards a dead server waits up to 3 s, and the next attempt must not
        for s in ices:
            if s is not None:
                self._close_later(s)

    # -- upgrade of a relayed path ------------------------------------------------------
    # Make before break: the controlling side periodically runs a direct-only ICE session
    # (fresh credentials, no TURN) beside the working relay, exchanged as link_probe /
    # link_probe_answer. Keys belong to the link, not the path, so when the probe finds a
    # direct pair each side only swaps its send function (both sockets receive meanwhile)
    # and closes the relayed session; nothing is re-handshaken, no frame is lost.
    def _maybe_probe(self, now: float) -> None:
        if (self.path is not None and self.path.kind == "relay" and self._probe_task is None
                and now - self._last_probe >= self._probe_every):
            self._last_probe = now
            self._probe_task = self._spawn(self._probe_controlling())

    async def _probe_controlling(self) -> None:
        t, attempt = self.timers, self.attempt
        probe = self.probe = self._new_ice(attempt, direct_only=True)
        try:
            local = await self._bounded(probe.gather(), t.gather_timeout, "probe gathering")
            self._probe_answer = asyncio.get_running_loop().create_future()
            self._signal("link_probe", {"attempt": attempt, **local})
            answer = await self._bounded(self._probe_answer, t.answer_timeout, "probe answer")
            await self._probe_finish(probe, answer, attempt)
        except Exception as e:            # a probe failing never touches the working path
            log.info("link %s: no direct path yet (%s)", self.spec.link_id, e)
            await self._probe_drop(probe)
        finally:
            self._probe_task = self._probe_answer = None
            self._probe_every = jitter(self.timers.upgrade_interval)
            self._check_soon()

    async def _probe_controlled(self, offer: dict) -> None:
        attempt = self.attempt
        probe = self.probe = self._new_ice(attempt, direct_only=True)
        try:
            local = await self._bounded(probe.gather(), self.timers.gather_timeout, "probe gathering")
            self._signal("link_probe_answer", {"attempt": attempt, **local})
            await self._probe_finish(probe, offer, attempt)
        except Exception as e:
            log.info("link %s: probe answered, no direct path (%s)", self.spec.link_id, e)
            await self._probe_drop(probe)
        finally:
            self._probe_task = None

    async def _probe_finish(self, probe: IceSession, remote: dict, attempt: int) -> None:
        n = await probe.set_remote(remote.get("ufrag"), remote.get("pwd"), remote.get("candidates"))
        if n == 0:
            raise AttemptEnded("peer sent no direct candidates")
        path = await self._bounded(probe.connect(), self.timers.checks_timeout, "probe checks")
        probe.stop_consent()
        if path.kind != "direct":
            raise AttemptEnded(f"probe selected a {path.kind} pair")
        if attempt != self.attempt or self.state != State.UP or self.ice is None:
            raise AttemptEnded("the attempt changed while probing")
        old, self.ice, self.probe = self.ice, probe, None
        self._use_path(path)
        self.upgrades += 1
        log.info("link %s: upgraded to a direct path %s -> %s", self.spec.link_id, path.local, path.remote)
        self._emit({"kind": "path", "link_id": self.spec.link_id, "peer_id": self.spec.peer_id,
                    "tap": self.spec.tap, "attempt": attempt, **path.describe()})
        # the peer may still be sending on the relay until its own checks end: keep receiving
        # there a little longer (closing it now lost ~0.4 s of the peer's frames)
        self._retired.add(old)
        self._spawn(self._retire(old))

    async def _retire(self, old: IceSession) -> None:
        try:
            await asyncio.sleep(self.timers.path_linger)
        finally:
            self._retired.discard(old)
            await old.close()

    async def _probe_drop(self, probe: IceSession) -> None:
        if self.probe is probe:
            self.probe = None
        await probe.close()

    # -- port prediction ---------------------------------------------------------------
    # Beside a relayed path that came up between a hard and an easy NAT, both sides run
    # their part of one birthday-probing run at once (roles from the candidates both have);
    # the relay carries the frames meanwhile. A win swaps the send function as an upgrade
    # does; the predicted socket (hard side) lives until the attempt ends.
    async def _run_prediction(self, attempt: int) -> None:
        ice = self.ice
        if ice is None:
            return
        local, remote = ice.candidates()
        p = predict.plan(local, remote)
        if p is None:
            return
        mine, theirs = (ice.ufrag, ice.pwd), (ice.remote_ufrag, ice.remote_pwd)
        k = predict.key(*((mine, theirs) if self.spec.controlling else (theirs, mine)))
        easy_proto = None
        if p.role == predict.EASY:
            easy_proto = ice.protocol_at(*p.easy_base)
            if easy_proto is None:
                return
        run = self._predict = predict.Prediction(p, k, easy_protocol=easy_proto)
        if easy_proto is not None:      # for the ICE session's life: late requests still answered
            set_side_handler(easy_proto, run.received)
        self.prediction = {"role": "hard" if p.role == predict.HARD else "easy", "result": "running"}
        t0 = time.monotonic()
        win = await run.run()
        self.prediction.update(result="found" if win else "none", sent=run.sent, bad=run.bad,
                               after_s=round(time.monotonic() - t0, 3))
        if win is None:
            log.info("link %s: port prediction found no path (%d sent)", self.spec.link_id, run.sent)
            return
        if attempt != self.attempt or self.state != State.UP or self.dp is None:
            run.close_all()
            return
        if p.role == predict.HARD:
            install_hook(win.protocol, self.dp.receive)
        path = predicted_path(win.protocol, win.addr)
        self._use_path(path)
        self.upgrades += 1
        log.info("link %s: predicted path %s -> %s after %.2fs (%d sent)", self.spec.link_id,
                 path.local, path.remote, win.after, win.probes)
        self._emit({"kind": "path", "link_id": self.spec.link_id, "peer_id": self.spec.peer_id,
                    "tap": self.spec.tap, "attempt": attempt, **path.describe()})
        self._check_soon()

    # -- handshake messages ----------------------------------------------------------
    def _on_handshake_packet(self, data: bytes, protocol, addr: tuple) -> None:
        """A handshake message from ``addr``. While the link is up, only the selected pair's
        remote address may send them (a rekey comes the way the data comes); the rest of
        the admission (shape, mac1, rates) is keys.py's."""
        t = data[0]
        keys = self.keys
        assert keys is not None
        if t == codec.TYPE_INIT and not self.spec.controlling:
            if not keys.prologue or self.state in (State.WAIT_OFFER, State.BACKOFF, State.CLOSED):
                self.stats.drops["handshake_unexpected"] += 1
                return
            if not self._from_peer(addr):
                return
            pkt = keys.on_initiation(data, addr)
            if pkt is not None:
                try:
                    reply(protocol, pkt, addr)     # back where the initiation came from
                except OSError:
                    self.stats.drops["send_error"] += 1
        elif t == codec.TYPE_RESP and self.spec.controlling:
            if not keys.handshaking:
                self.stats.drops["handshake_unexpected"] += 1
                return
            if self._from_peer(addr) and keys.on_response(data, addr):
                self.dp.send_control(codec.CTRL_KEEPALIVE)    # confirms the session at the responder  # type: ignore[union-attr]
                self._check_soon()
        else:
            self.stats.drops["handshake_unexpected"] += 1

    def _from_peer(self, addr: tuple) -> bool:
        """Up: a handshake message must come from the selected pair's remote address."""
        if self.state == State.UP and self.path is not None and not same_addr(addr, self.path.remote_addr):
            self.stats.drops["handshake_source"] += 1
            return False
        return True

    def _on_confirm(self, s: Session) -> None:
        """Responder: the initiator used the new session, so switch sending to it."""
        if self.keys is not None and self.keys.on_confirm(s):
            self._confirmed.set()
            self._check_soon()

    # -- control messages --------------------------------------------------------------
    def _on_control(self, s: Session, plain: bytes) -> None:
        if not plain:
            return                                            # keepalive
        if plain[0] == codec.CTRL_PING and len(plain) == 9:
            self.dp.send_control(bytes([codec.CTRL_PONG]) + plain[1:])  # type: ignore[union-attr]
        elif plain[0] == codec.CTRL_PONG and len(plain) == 9:
            sent = int.from_bytes(plain[1:], "big")
            rtt = (time.monotonic_ns() - sent) / 1e6
            if 0 <= rtt < 60_000:
                self.stats.rtt_ms = rtt
        else:
            self.stats.drops["control_unknown"] += 1

    def _on_stray(self) -> None:
        self.stats.drops["not_ours"] += 1

    # -- helpers ------------------------------------------------------------------------
    def _rx_age(self) -> float:
        return time.monotonic() - self.stats.last_rx if self.stats.last_rx else 1e9

    def _signal(self, type_: str, payload: dict) -> None:
        self._emit({"kind": "signal", "link_id": self.spec.link_id, "peer_id": self.spec.peer_id,
                    "type": type_, "payload": {"link_id": self.spec.link_id, **payload}})

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def snapshot(self) -> dict:
        """The link's state and counters, under the names ``status`` shows."""
        d = {"link_id": self.spec.link_id, "peer_id": self.spec.peer_id, "tap": self.spec.tap,
             "state": self.state.value, "attempt": self.attempt, "controlling": self.spec.controlling,
             "up_for": round(time.monotonic() - self.up_since, 3) if self.up_since else 0.0,
             "upgrades": self.upgrades, "prediction": self.prediction or None,
             **self.stats.as_dict()}
        if self.path:
            d.update(self.path.describe())
            d["candidates"] = self.path.candidates()
        else:
            d.update({"path": None, "local": None, "remote": None, "candidates": None})
        cur = self.dp.current if self.dp else None
        d["last_handshake_s"] = round(time.monotonic() - cur.created, 3) if cur else None
        d["session_index"] = cur.local_index if cur else None
        return d
