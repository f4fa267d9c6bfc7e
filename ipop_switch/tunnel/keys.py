"""The handshakes of one link: who starts them, how often they are retried and accepted,
and the sessions they put in the link's ``SessionTable`` (the Noise IK messages
themselves are handshake.py).

The controlling side is always the initiator: it sends a fresh initiation every
``handshake_retry`` until answered, and rekeys when ``current`` is ``rekey_after`` old.
Every message carries a mac1 (admission.py) and is checked, in this order, before any
X25519: its exact shape, its mac1, a rate per source address; then the responder opens
at most ``HANDSHAKE_RATE`` initiations a second (three X25519 each), only with growing
timestamps within one attempt, and sends with the new session only once the initiator
has used it (key confirmation: docs/tunnel.md, "Key confirmation and switching"); the
replaced session keeps receiving for ``previous_keep``.
"""

from __future__ import annotations

import time
from typing import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import codec
from . import handshake as hs
from .admission import SourceLimiter, add_mac1, mac1_key, refusal
from .session import Session, SessionTable
from .stats import Stats
from .timers import Timers

HANDSHAKE_RATE = 20            # initiations processed per second at most (3 X25519 each)


class Keys:
    """Handshake state of one link (an ICE attempt sets the prologue; ``reset`` ends it)."""

    def __init__(self, static: X25519PrivateKey, peer_static: bytes, link_id: str,
                 timers: Timers, stats: Stats, table: SessionTable) -> None:
        self.static = static
        self.peer_static = peer_static
        self.link_id = link_id
        self.timers = timers
        self.stats = stats
        self.table = table
        self.prologue = b""
        self._initiator: hs.Initiator | None = None
        self._hs_sent = 0.0
        self._last_ts = 0
        self._last_init_ts = -1
        self._bucket = (0.0, 0)
        self._mac_out = mac1_key(peer_static)              # what we send is keyed to the peer
        self._mac_in = mac1_key(hs.pub_bytes(static))      # what we receive, to us
        self._sources = SourceLimiter()

    @property
    def handshaking(self) -> bool:
        """The initiator waits for a response."""
        return self._initiator is not None

    @property
    def next_retry(self) -> float:
        """When ``tick`` sends the next initiation (while handshaking)."""
        return self._hs_sent + self.timers.handshake_retry

    def set_prologue(self, ufrag_controlling: str, ufrag_controlled: str) -> None:
        """Bind this attempt's handshakes to the link and its ICE credentials."""
        self.prologue = hs.prologue_for(self.link_id, ufrag_controlling, ufrag_controlled)
        self._last_init_ts = -1

    def reset(self) -> None:
        """The attempt is over: no handshake in flight (the prologue stays until the next)."""
        self._initiator = None

    # -- initiator ----------------------------------------------------------------------
    def start(self) -> None:
        self._initiator = hs.Initiator(self.static, self.peer_static, self.prologue)
        self._hs_sent = 0.0

    def tick(self, send: Callable[[bytes], None] | None) -> None:
        """Initiator: (re)send a fresh initiation every handshake_retry until answered."""
        if self._initiator is None or send is None:
            return
        now = time.monotonic()
        if now - self._hs_sent < self.timers.handshake_retry:
            return
        self._hs_sent = now
        self._last_ts = max(time.time_ns(), self._last_ts + 1)
        pkt = add_mac1(self._mac_out, self._initiator.initiation(hs.new_index(), self._last_ts))
        try:
            send(pkt)
        except OSError:
            self.stats.drops["send_error"] += 1

    def _admit(self, data: bytes, addr: tuple, type_: int) -> bytes | None:
        """The Noise message in ``data`` if it is worth opening (shape, mac1, the source's
        rate: admission.py), else None and the drop counted."""
        why = refusal(self._mac_in, data, type_)
        if why is None and not self._sources.allow(addr[0]):
            why = "handshake_source_limit"
        if why is not None:
            self.stats.drops[why] += 1
            return None
        return data[:-codec.MAC1_LEN]

    def on_response(self, data: bytes, addr: tuple) -> bool:
        """Initiator: a response from ``addr``. True if it made the new current session (it
        must then be confirmed to the responder by sending with it)."""
        if self._initiator is None:
            self.stats.drops["handshake_unexpected"] += 1
            return False
        msg = self._admit(data, addr, codec.TYPE_RESP)
        if msg is None:
            return False
        try:
            keys = self._initiator.consume_response(msg)
        except hs.HandshakeError:
            self.stats.drops["handshake_auth"] += 1
            return False
        self._initiator = None
        s = Session(keys.send_key, keys.recv_key, keys.local_index, keys.remote_index, initiator=True)
        self.table.install(s, self.timers.previous_keep)
        self.stats.handshakes += 1
        return True

    # -- responder ----------------------------------------------------------------------
    def _rate_ok(self) -> bool:
        now = time.monotonic()
        start, n = self._bucket
        if now - start >= 1.0:
            self._bucket = (now, 1)
            return True
        if n >= HANDSHAKE_RATE:
            return False
        self._bucket = (start, n + 1)
        return True

    def on_initiation(self, data: bytes, addr: tuple) -> bytes | None:
        """Responder: an initiation from ``addr``. Returns the response to send back there,
        or None (counted). The new session receives at once and sends once confirmed."""
        msg = self._admit(data, addr, codec.TYPE_INIT)
        if msg is None:
            return None
        if not self._rate_ok():
            self.stats.drops["handshake_ratelimit"] += 1
            return None
        r = hs.Responder(self.static, self.peer_static, self.prologue)
        try:
            got = r.consume_initiation(msg)
        except hs.HandshakeError:
            self.stats.drops["handshake_auth"] += 1
            return None
        if got.timestamp <= self._last_init_ts:
            self.stats.drops["handshake_replay"] += 1
            return None
        self._last_init_ts = got.timestamp
        pkt, keys = r.response(got, hs.new_index())
        s = Session(keys.send_key, keys.recv_key, keys.local_index, keys.remote_index, initiator=False)
        self.table.add_next(s)
        self.stats.handshakes += 1
        return add_mac1(self._mac_out, pkt)

    def on_confirm(self, s: Session) -> bool:
        """Responder: the initiator used ``s``; True if it now sends (it was our next)."""
        return self.table.confirm(s, self.timers.previous_keep)
