"""The signed signaling message: encoding, parsing and the signature input (spec: docs/signaling.md).

On the wire a message is one XML element in an XMPP <message>:

    <ipsw xmlns="urn:ipop-switch:signaling:1" sig="BASE64(Ed25519 signature)">BASE64(envelope JSON)</ipsw>

The envelope is compact JSON: {"v":1,"ov":overlay,"from":node id,"to":node id,"type":str,
"ts":unix ms,"nonce":32 hex,"body":{...}}. The signature covers CONTEXT + the exact envelope
bytes, so no canonical form is needed: the receiver verifies the bytes it got, then parses them.
Base64 keeps the bytes intact through any XML serializer. The XMPP server sees only an opaque blob.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

NAMESPACE = "urn:ipop-switch:signaling:1"
ELEMENT = "ipsw"
VERSION = 1
CONTEXT = b"ipop-switch signaling v1\x00"     # domain separation: this key signs nothing else like it
MAX_BODY = 16 * 1024                          # a body's JSON (payload of link messages), bytes
MAX_SEALED = 4 * math.ceil((MAX_BODY + 48) / 3) + 16   # the largest body sealed (seal.py): base64 + key + tag
MAX_ENVELOPE = MAX_SEALED + 2048              # body + certificate in an announce + the fixed fields
MAX_WIRE = 4 * math.ceil(MAX_ENVELOPE / 3)    # base64 of the largest envelope
SIG_LEN = 64

NODE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
OVERLAY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
NONCE_RE = re.compile(r"^[0-9a-f]{32}$")

# message types the session handles itself; every other type goes to the application
ANNOUNCE = "announce"
RESERVED = frozenset({ANNOUNCE})


class Drop(Exception):
    """A received message is rejected; ``reason`` is the counter it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Envelope:
    overlay: str
    sender: str
    recipient: str
    type: str
    body: dict[str, Any]
    ts_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))

    def to_bytes(self) -> bytes:
        return json.dumps({"v": VERSION, "ov": self.overlay, "from": self.sender, "to": self.recipient,
                           "type": self.type, "ts": self.ts_ms, "nonce": self.nonce, "body": self.body},
                          separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def json_bytes(body: dict) -> bytes:
    """A body as compact JSON (what is sealed, and what the size limit counts)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def body_size(body: dict) -> int:
    """Size of a body as encoded; raises ValueError for what JSON cannot carry (NaN, sets, ...)."""
    return len(json_bytes(body))


def check_outgoing(msg_type: str, body: Any) -> None:
    """Reject at the sender what every receiver would drop (a programming error, said clearly)."""
    if not isinstance(msg_type, str) or not TYPE_RE.match(msg_type):
        raise ValueError(f"bad message type {msg_type!r}: [a-z][a-z0-9_]{{0,31}}")
    if not isinstance(body, dict):
        raise ValueError("a message payload must be a dict")
    try:
        n = body_size(body)
    except (TypeError, ValueError) as e:
        raise ValueError(f"payload is not plain JSON: {e}") from None
    if n > MAX_BODY:
        raise ValueError(f"payload of {n} bytes exceeds the {MAX_BODY}-byte limit")


def sign_input(raw: bytes) -> bytes:
    return CONTEXT + raw


def encode(env: Envelope, sign: Callable[[bytes], bytes]) -> tuple[str, str]:
    """(element text, sig attribute) of a signed message."""
    raw = env.to_bytes()
    if len(raw) > MAX_ENVELOPE:
        raise ValueError(f"message of {len(raw)} bytes exceeds {MAX_ENVELOPE}")
    return base64.b64encode(raw).decode(), base64.b64encode(sign(sign_input(raw))).decode()


def _reject_constant(c: str) -> None:
    raise ValueError(f"{c} is not JSON")


def parse(text: str | None, sig: str | None) -> tuple[Envelope, bytes, bytes]:
    """Parse (not verify) a received element: (envelope, signed bytes, signature).
    Cheap checks first, so junk costs little; raises Drop(reason)."""
    text = (text or "").strip()
    if len(text) > MAX_WIRE or (sig is not None and len(sig) > 2 * SIG_LEN):
        raise Drop("oversized", f"{len(text)} chars")
    if not sig:
        raise Drop("unsigned")
    try:
        signature = base64.b64decode(sig, validate=True)
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Drop("malformed", "not base64") from None
    if len(signature) != SIG_LEN:
        raise Drop("malformed", "signature length")
    if len(raw) > MAX_ENVELOPE:
        raise Drop("oversized", f"{len(raw)} bytes")
    try:
        d = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise Drop("malformed", "not JSON") from None
    if not isinstance(d, dict):
        raise Drop("malformed", "not an object")
    v = d.get("v")
    if v != VERSION:
        raise Drop("bad_version" if isinstance(v, int) and not isinstance(v, bool) else "malformed", f"v={v!r}")
    ov, snd, rcp, typ, ts, nonce, body = (d.get(k) for k in ("ov", "from", "to", "type", "ts", "nonce", "body"))
    if not (isinstance(ov, str) and OVERLAY_RE.match(ov)):
        raise Drop("malformed", "ov")
    if not (isinstance(snd, str) and NODE_ID_RE.match(snd)) or not (isinstance(rcp, str) and NODE_ID_RE.match(rcp)):
        raise Drop("malformed", "from/to")
    if not (isinstance(typ, str) and TYPE_RE.match(typ)):
        raise Drop("malformed", "type")
    if not (isinstance(ts, int) and not isinstance(ts, bool) and 0 <= ts < 2**53):
        raise Drop("malformed", "ts")
    if not (isinstance(nonce, str) and NONCE_RE.match(nonce)):
        raise Drop("malformed", "nonce")
    if not isinstance(body, dict):
        raise Drop("malformed", "body")
    return Envelope(ov, snd, rcp, typ, body, ts, nonce), raw, signature
