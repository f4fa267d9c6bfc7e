"""Transport sessions: one ``Session`` per handshake (its keys, send counter and replay
window), and the ``SessionTable`` of one link that says which of them sends and which
still receive. The handshakes that make sessions are in keys.py; the send and receive
loops only read the table."""

from __future__ import annotations

import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import accel, codec

ZERO4 = b"\0\0\0\0"


class Session:
    """One set of transport keys (one handshake). Receiving and sending state."""

    __slots__ = ("local_index", "remote_index", "send_aead", "recv_aead", "counter", "window",
                 "created", "prefix", "ridx", "confirmed", "initiator", "tx_fast")

    def __init__(self, send_key: bytes, recv_key: bytes, local_index: int, remote_index: int,
                 *, initiator: bool, window: int = 2048) -> None:
        self.local_index = local_index
        self.remote_index = remote_index
        self.send_aead = AESGCM(send_key)
        self.recv_aead = AESGCM(recv_key)
        self.counter = 0
        # With the C loops (accel) the window lives in C beside the receive key, so both
        # paths share it; the send key there seals super-frames (``tx_fast``).
        fp = accel.fastpath
        self.window = fp.RxState(recv_key, window) if fp else codec.ReplayWindow(window)
        self.tx_fast = fp.TxKey(send_key) if fp else None
        self.created = time.monotonic()
        self.prefix = codec.data_prefix(remote_index)
        self.ridx = self.prefix[4:]
        # The responder may only send with a new session once the initiator has used it
        # (proves the initiator has the keys); the initiator's sessions are confirmed at once.
        self.confirmed = initiator
        self.initiator = initiator

    def seal(self, plaintext, fmt: int = 0, csum_start: int = 0) -> bytes:
        c = self.counter
        self.counter = c + 1
        cb = c.to_bytes(8, "big")
        if fmt:
            header = bytes((codec.TYPE_DATA, fmt, csum_start >> 8, csum_start & 0xFF)) + self.ridx + cb
        else:
            header = self.prefix + cb
        return header + self.send_aead.encrypt(ZERO4 + cb, plaintext, header)


class SessionTable:
    """The sessions of one link by role. ``current`` seals what we send; every session in
    ``by_index`` (local index -> session) opens what we receive: ``current``, the one it
    replaced (``previous``, for in-flight packets until ``previous_until``) and, on the
    responder, the new one the initiator has not used yet (``next``)."""

    __slots__ = ("current", "previous", "next", "previous_until", "by_index")

    def __init__(self) -> None:
        self.current: Session | None = None
        self.previous: Session | None = None
        self.next: Session | None = None
        self.previous_until = 0.0
        self.by_index: dict[int, Session] = {}

    def install(self, s: Session, keep: float) -> None:
        """``s`` sends from now on; the session it replaces still receives for ``keep`` s."""
        old = self.current
        if self.previous is not None and self.previous is not old:
            self.drop(self.previous)
        self.previous = old
        self.previous_until = time.monotonic() + keep
        self.by_index[s.local_index] = s
        self.current = s

    def add_next(self, s: Session) -> None:
        """Responder: ``s`` receives now, and sends once the initiator used it (``confirm``)."""
        if self.next is not None:
            self.drop(self.next)
        self.next = s
        self.by_index[s.local_index] = s

    def confirm(self, s: Session, keep: float) -> bool:
        """The peer used ``s``: if it is our ``next``, it becomes ``current``. True if so."""
        if s is not self.next:
            return False
        self.next = None
        self.install(s, keep)
        return True

    def expire(self, now: float) -> None:
        """Stop receiving with the replaced session once its time is over."""
        if self.previous is not None and now > self.previous_until:
            self.drop(self.previous)
            self.previous = None

    def drop(self, s: Session) -> None:
        if self.by_index.get(s.local_index) is s:
            del self.by_index[s.local_index]

    def clear(self) -> None:
        self.current = self.previous = self.next = None
        self.by_index.clear()
