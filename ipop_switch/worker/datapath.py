"""The per-frame hot path: TAP -> AEAD -> UDP and UDP -> AEAD -> TAP, one packet at a time.

Kept in one module on purpose: the performance issue replaces it with a batched
path (TSO reads, UDP GSO/GRO, coalesced TAP writes; see datapath-facts.md).
Everything here runs in the pool process's event loop (uvloop): the TAP is read
with ``add_reader`` and drained up to ``TAP_BURST`` frames per wake-up; datagrams
arrive through the ICE socket's protocol (a hook installed by the link worker).
Nothing in here raises on bad input: every refusal is a counted drop.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import codec

TAP_BURST = 64
ZERO4 = b"\0\0\0\0"

Sender = Callable[[bytes], None]


class Session:
    """One set of transport keys (one handshake). Receiving and sending state."""

    __slots__ = ("local_index", "remote_index", "send_aead", "recv_aead", "counter", "window",
                 "created", "prefix", "confirmed", "initiator", "rx_packets")

    def __init__(self, send_key: bytes, recv_key: bytes, local_index: int, remote_index: int,
                 *, initiator: bool, window: int = 2048) -> None:
        self.local_index = local_index
        self.remote_index = remote_index
        self.send_aead = AESGCM(send_key)
        self.recv_aead = AESGCM(recv_key)
        self.counter = 0
        self.window = codec.ReplayWindow(window)
        self.created = time.monotonic()
        self.prefix = codec.data_prefix(remote_index)
        # The responder may only send with a new session once the initiator has used it
        # (proves the initiator has the keys); the initiator's sessions are confirmed at once.
        self.confirmed = initiator
        self.initiator = initiator
        self.rx_packets = 0

    def seal(self, plaintext: bytes) -> bytes:
        c = self.counter
        self.counter = c + 1
        cb = c.to_bytes(8, "big")
        header = self.prefix + cb
        return header + self.send_aead.encrypt(ZERO4 + cb, plaintext, header)


class Stats:
    """Counters a link reports to the agent."""

    __slots__ = ("tx_frames", "tx_bytes", "rx_frames", "rx_bytes", "drops", "last_rx", "last_tx",
                 "rtt_ms", "handshakes")

    def __init__(self) -> None:
        self.tx_frames = self.tx_bytes = self.rx_frames = self.rx_bytes = 0
        self.drops: Counter[str] = Counter()
        self.last_rx = 0.0          # monotonic time of the last authenticated packet
        self.last_tx = 0.0
        self.rtt_ms: float | None = None
        self.handshakes = 0

    def as_dict(self) -> dict:
        now = time.monotonic()
        return {
            "tx_frames": self.tx_frames, "tx_bytes": self.tx_bytes,
            "rx_frames": self.rx_frames, "rx_bytes": self.rx_bytes,
            "drops": dict(self.drops),
            "since_last_rx": None if not self.last_rx else round(now - self.last_rx, 3),
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "handshakes": self.handshakes,
        }


class Datapath:
    """Frames of one link. The link worker sets ``current`` / ``previous`` / ``next_``
    sessions and ``send``; control plaintexts (keepalive, ping, pong) go to ``on_control``."""

    def __init__(self, tap_fd: int, stats: Stats, on_control: Callable[[Session, bytes], None],
                 on_handshake: Callable[[bytes, object, tuple], None]) -> None:
        self.tap_fd = tap_fd
        self.stats = stats
        self.on_control = on_control
        self.on_handshake = on_handshake
        self.send: Sender | None = None
        self.current: Session | None = None
        self.sessions: dict[int, Session] = {}     # local index -> session (current, previous, next)
        self.on_confirm: Callable[[Session], None] | None = None
        self.max_frame = 65535

    # -- TAP -> UDP ------------------------------------------------------------
    def tap_readable(self) -> None:
        fd = self.tap_fd
        st = self.stats
        for _ in range(TAP_BURST):
            try:
                frame = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                st.drops["tap_read"] += 1
                return
            s = self.current
            send = self.send
            if s is None or send is None or not s.confirmed:
                st.drops["no_session"] += 1
                continue
            if s.counter >= codec.REJECT_AFTER_MESSAGES:
                st.drops["counter_exhausted"] += 1
                continue
            if len(frame) > self.max_frame:
                st.drops["too_big"] += 1
                continue
            try:
                send(s.seal(frame))
            except OSError:
                st.drops["send_error"] += 1
                continue
            st.tx_frames += 1
            st.tx_bytes += len(frame)
        st.last_tx = time.monotonic()

    def send_control(self, plaintext: bytes) -> bool:
        s, send = self.current, self.send
        if s is None or send is None or not s.confirmed:
            return False
        try:
            send(s.seal(plaintext))
        except OSError:
            self.stats.drops["send_error"] += 1
            return False
        self.stats.last_tx = time.monotonic()
        return True

    # -- UDP -> TAP ------------------------------------------------------------
    def datagram(self, data: bytes, addr: tuple, protocol: object) -> None:
        """Every datagram whose first byte is one of ours lands here."""
        t = data[0]
        if t != codec.TYPE_DATA:
            self.on_handshake(data, protocol, addr)
            return
        st = self.stats
        if len(data) < codec.DATA_MIN_LEN or data[1:4] != b"\0\0\0":
            st.drops["malformed"] += 1
            return
        s = self.sessions.get(int.from_bytes(data[4:8], "little"))
        if s is None:
            st.drops["unknown_index"] += 1
            return
        cb = data[8:16]
        counter = int.from_bytes(cb, "big")
        w = s.window
        if not w.check(counter):
            st.drops["replay"] += 1
            return
        try:
            plain = s.recv_aead.decrypt(ZERO4 + cb, data[16:], data[:16])
        except InvalidTag:
            st.drops["auth"] += 1
            return
        w.update(counter)
        st.last_rx = time.monotonic()
        s.rx_packets += 1
        if not s.confirmed:
            s.confirmed = True
            if self.on_confirm:
                self.on_confirm(s)
        if len(plain) < codec.ETH_MIN:
            self.on_control(s, plain)
            return
        try:
            os.write(self.tap_fd, plain)
        except (BlockingIOError, InterruptedError):
            st.drops["tap_full"] += 1
            return
        except OSError:
            st.drops["tap_write"] += 1
            return
        st.rx_frames += 1
        st.rx_bytes += len(plain)
