"""Which handshake datagrams are worth a responder's (or initiator's) X25519 work.

Three X25519 operations per initiation make handshakes the one costly thing a stranger
can ask of a link, so a shared budget (keys.HANDSHAKE_RATE) caps them. That budget must
only be spent on messages that could be genuine; otherwise anyone who sends 20 junk
datagrams a second to a node's ICE port starves its handshakes and rekeys (security review,
finding 2). As WireGuard does (its mac1; not its cookie replies), in this order
(docs/tunnel.md, §3 "Admission"):

1. exact shape first: type, length and reserved bytes (``codec.*_WIRE_LEN``);
2. ``mac1``: a keyed BLAKE2s-128 over the message, keyed by
   ``HASH("mac1----" || receiver's static public key)``. Only a sender who knows the
   receiver's static key (from its certificate) can make one; checking costs a hash;
3. a token bucket per source address (``SourceLimiter``, a bounded table), so one
   source cannot use the whole shared budget;
4. (link.py, checked before all of these) while the link is up, only the selected
   pair's remote address.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from . import codec

LABEL_MAC1 = b"mac1----"
MAC1_LEN = codec.MAC1_LEN

SOURCE_RATE = 5.0          # handshake messages a second per source address (retries: 1 a second)
SOURCE_BURST = 5.0
MAX_SOURCES = 1024         # sources tracked per link; a full table refuses new ones


def mac1_key(static_pub: bytes) -> bytes:
    """The mac1 key of messages *to* the holder of ``static_pub``."""
    return hashlib.blake2s(LABEL_MAC1 + static_pub).digest()


def mac1(key: bytes, msg: bytes) -> bytes:
    return hashlib.blake2s(msg, key=key, digest_size=MAC1_LEN).digest()


def add_mac1(key: bytes, msg: bytes) -> bytes:
    """``msg`` as it goes on the wire: followed by its mac1."""
    return msg + mac1(key, msg)


def refusal(key: bytes, pkt: bytes, type_: int) -> str | None:
    """Why ``pkt`` is not worth opening (a drop reason), or None if it is."""
    want = codec.INIT_WIRE_LEN if type_ == codec.TYPE_INIT else codec.RESP_WIRE_LEN
    if len(pkt) != want or pkt[0] != type_ or pkt[1:4] != b"\0\0\0":
        return "handshake_malformed"
    if not hmac.compare_digest(mac1(key, pkt[:-MAC1_LEN]), pkt[-MAC1_LEN:]):
        return "handshake_mac"
    return None


class SourceLimiter:
    """A token bucket per source address: ``rate`` a second, up to ``burst`` at once.
    At most ``max_sources`` are tracked; an entry that has refilled completely is the same
    as none, so those are dropped when the table is full, and a still-full table refuses
    new sources (as WireGuard's ratelimiter does)."""

    def __init__(self, rate: float = SOURCE_RATE, burst: float = SOURCE_BURST,
                 max_sources: int = MAX_SOURCES) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: dict[str, tuple[float, float]] = {}      # source -> (tokens, when)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        b = self._buckets.get(source)
        if b is None:
            if len(self._buckets) >= self.max_sources and not self._prune(now):
                return False
            self._buckets[source] = (self.burst - 1.0, now)
            return True
        tokens = min(self.burst, b[0] + (now - b[1]) * self.rate)
        if tokens < 1.0:
            self._buckets[source] = (tokens, now)
            return False
        self._buckets[source] = (tokens - 1.0, now)
        return True

    def _prune(self, now: float) -> bool:
        """Forget sources whose bucket is full again; True if there is room now."""
        for k in [k for k, (t, w) in self._buckets.items() if t + (now - w) * self.rate >= self.burst]:
            del self._buckets[k]
        return len(self._buckets) < self.max_sources
