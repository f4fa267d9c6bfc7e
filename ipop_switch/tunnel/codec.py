"""Wire format of the tunnel: packet types, headers, and the replay window.

Every packet on a link's socket starts with a type byte. Ours are 0xE1..0xE3, so
they stay clear of STUN (0-3), DTLS (20-63), TURN channel data (64-79) and RTP
(128-191) and one socket carries ICE checks and tunnel traffic (RFC 7983).
Full description: docs/tunnel.md. Parsing never raises on bad input: it returns
None and the caller counts the drop by reason.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

TYPE_INIT = 0xE1        # handshake initiation (Noise IK message 1)
TYPE_RESP = 0xE2        # handshake response (Noise IK message 2)
TYPE_DATA = 0xE3        # transport data (AEAD of an Ethernet frame, a keepalive or a control message)
OUR_TYPES = frozenset((TYPE_INIT, TYPE_RESP, TYPE_DATA))

KEY_LEN = 32
TAG_LEN = 16
INIT_PAYLOAD_LEN = 12   # sender index (4) + timestamp (8)
RESP_PAYLOAD_LEN = 8    # sender index (4) + receiver index (4)
INIT_LEN = 8 + KEY_LEN + (KEY_LEN + TAG_LEN) + (INIT_PAYLOAD_LEN + TAG_LEN)   # 116
RESP_LEN = 12 + KEY_LEN + (RESP_PAYLOAD_LEN + TAG_LEN)                          # 68
# On the wire each handshake message is followed by mac1 (admission.py), outside the
# Noise message: INIT_LEN/RESP_LEN are the messages, the *_WIRE_LEN the datagrams.
MAC1_LEN = 16
INIT_WIRE_LEN = INIT_LEN + MAC1_LEN                                             # 132
RESP_WIRE_LEN = RESP_LEN + MAC1_LEN                                             # 84
DATA_HEADER_LEN = 16
DATA_MIN_LEN = DATA_HEADER_LEN + TAG_LEN                                        # 32: an empty keepalive
OVERHEAD = DATA_MIN_LEN     # bytes a data packet adds to a frame

# Control messages travel as data packets whose plaintext is shorter than an
# Ethernet header (14 bytes), so they can never be mistaken for a frame.
CTRL_KEEPALIVE = b""
CTRL_PING = 0x01        # + 8-byte sender timestamp (ns)
CTRL_PONG = 0x02        # + the echoed 8-byte timestamp
ETH_MIN = 14

# Data format (data header byte 1, inside the AEAD's AAD; docs/tunnel.md "Data packets").
# 0: a complete frame (format v1). With FMT_CSUM the frame has a partial checksum
# (NEEDS_CSUM): bytes 2-3 hold csum_start (big-endian), the checksum field is at
# csum_start + 16 with FMT_TCP (a TCP segment the receiver may coalesce), else + 6 (UDP).
# FMT_CONT (only with CSUM|TCP, only to a peer that announced "cont"): the next segment of
# the super-frame the previous counter came from; the receiver may append it to the open
# run without comparing headers.
FMT_CSUM = 0x01
FMT_TCP = 0x02
FMT_CONT = 0x04
FMT_KNOWN = FMT_CSUM | FMT_TCP | FMT_CONT
FMT_SEG = FMT_CSUM | FMT_TCP                 # a TCP segment: the hot case
FMT_CONT_SEG = FMT_SEG | FMT_CONT            # ... continuing the previous one's super-frame
OFFLOAD_VERSION = 1                          # the "offload" hint both ends must announce

# Counters: a session stops sending well before the 64-bit nonce space ends.
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1

_INIT_HDR = struct.Struct("<B3xI")
_RESP_HDR = struct.Struct("<B3xII")
_DATA_PREFIX = struct.Struct("<B3xI")


@dataclass(frozen=True)
class Initiation:
    sender: int
    ephemeral: bytes       # 32
    enc_static: bytes      # 48
    enc_payload: bytes     # 28


@dataclass(frozen=True)
class Response:
    sender: int
    receiver: int
    ephemeral: bytes       # 32
    enc_payload: bytes     # 24


def encode_initiation(m: Initiation) -> bytes:
    return _INIT_HDR.pack(TYPE_INIT, m.sender) + m.ephemeral + m.enc_static + m.enc_payload


def decode_initiation(b: bytes) -> Initiation | None:
    if len(b) != INIT_LEN or b[0] != TYPE_INIT or b[1:4] != b"\0\0\0":
        return None
    _, sender = _INIT_HDR.unpack_from(b)
    return Initiation(sender, bytes(b[8:40]), bytes(b[40:88]), bytes(b[88:116]))


def encode_response(m: Response) -> bytes:
    return _RESP_HDR.pack(TYPE_RESP, m.sender, m.receiver) + m.ephemeral + m.enc_payload


def decode_response(b: bytes) -> Response | None:
    if len(b) != RESP_LEN or b[0] != TYPE_RESP or b[1:4] != b"\0\0\0":
        return None
    _, sender, receiver = _RESP_HDR.unpack_from(b)
    return Response(sender, receiver, bytes(b[12:44]), bytes(b[44:68]))


def data_prefix(receiver: int) -> bytes:
    """The first 8 header bytes of every data packet to ``receiver`` (precomputed per session)."""
    return _DATA_PREFIX.pack(TYPE_DATA, receiver)


def encode_data_header(receiver: int, counter: int) -> bytes:
    """16-byte header: type, 3 zero bytes, receiver index (LE), counter (BE). It is the AEAD's AAD."""
    return data_prefix(receiver) + counter.to_bytes(8, "big")


@dataclass(frozen=True)
class DataHeader:
    receiver: int
    counter: int


def decode_data_header(b: bytes) -> DataHeader | None:
    """Header of a data packet, or None if it cannot be one (short, wrong type, reserved bits set)."""
    if len(b) < DATA_MIN_LEN or b[0] != TYPE_DATA or b[1:4] != b"\0\0\0":
        return None
    _, receiver = _DATA_PREFIX.unpack_from(b)
    return DataHeader(receiver, int.from_bytes(b[8:16], "big"))


def nonce_for(counter_bytes: bytes) -> bytes:
    """AES-GCM nonce of a data packet: 4 zero bytes + the 8 counter bytes of its header."""
    return b"\0\0\0\0" + counter_bytes


class ReplayWindow:
    """Sliding window over received counters (RFC 6479 idea, as WireGuard): accepts each
    counter at most once and nothing older than ``size`` behind the highest seen.

    ``check`` before decrypting (cheap rejection), ``update`` only after the AEAD
    verified the packet, so forged packets cannot move the window.
    """

    __slots__ = ("size", "highest", "bits", "_mask")

    def __init__(self, size: int = 2048) -> None:
        if size < 1:
            raise ValueError("replay window size must be positive")
        self.size = size
        self.highest = -1     # nothing received yet
        self.bits = 0         # bit i set: counter (highest - i) was received
        self._mask = (1 << size) - 1

    def check(self, counter: int) -> bool:
        if counter < 0 or counter > REJECT_AFTER_MESSAGES:
            return False
        if counter > self.highest:
            return True
        off = self.highest - counter
        return off < self.size and not (self.bits >> off) & 1

    def update(self, counter: int) -> bool:
        """Record ``counter``; False (and no change) if it is a replay or too old."""
        if not self.check(counter):
            return False
        if counter > self.highest:
            shift = counter - self.highest
            self.bits = ((self.bits << shift) | 1) & self._mask if shift < self.size else 1
            self.highest = counter
        else:
            self.bits |= 1 << (self.highest - counter)
        return True
