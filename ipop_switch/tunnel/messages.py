"""Typed messages between the agent's WorkerPool and its pool processes.

One local channel per pool process (a unix stream socketpair), frames of a 4-byte
big-endian length and a JSON object with a "kind". Keys travel hex-encoded: the
channel never leaves the machine (it is an inherited socketpair, not a path).
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_FRAME = 1 << 20


@dataclass(frozen=True)
class TurnServer:
    host: str
    port: int
    user: str
    password: str
    transport: str = "udp"          # "udp" | "tcp"


@dataclass(frozen=True)
class LinkSpec:
    """Everything a worker needs to run one link: the agent makes one per peer it links
    to (agent/overlay.py); docs/tunnel.md describes what the worker does with it."""
    link_id: str
    peer_id: str
    controlling: bool
    local_static: bytes             # our X25519 private key, 32 raw bytes
    peer_static: bytes              # the peer's X25519 public key, 32 raw bytes
    tap: str
    mtu: int = 1400
    stun: tuple[str, int] | None = None
    turn: TurnServer | None = None
    exclude_interfaces: tuple[str, ...] = ()
    ipv6: bool = True                # IPv6 host candidates (the host's global and ULA addresses)
    timers: dict[str, float] = field(default_factory=dict)
    # The bridge takes GSO frames and partial checksums on this TAP (OVS userspace datapath
    # with userspace-tso-enable, or the kernel datapath): only then is the batched format
    # accepted from the peer (docs/tunnel.md, "Offload negotiation").
    bridge_tso: bool = True
    offload: bool = True             # False: always the per-packet datapath (tests, trouble-shooting)
    port_prediction: bool = True     # a relayed hard<->easy link tries birthday probing (predict.py)

    def __post_init__(self) -> None:
        for name in ("local_static", "peer_static"):
            v = getattr(self, name)
            if not isinstance(v, (bytes, bytearray)) or len(v) != 32:
                raise ValueError(f"LinkSpec.{name} must be 32 raw bytes")
        if not self.link_id or len(self.link_id) > 128:
            raise ValueError("LinkSpec.link_id must be 1..128 characters")

    def to_json(self) -> dict:
        d = asdict(self)
        d["local_static"] = self.local_static.hex()
        d["peer_static"] = self.peer_static.hex()
        d["exclude_interfaces"] = list(self.exclude_interfaces)
        d["stun"] = list(self.stun) if self.stun else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "LinkSpec":
        d = dict(d)
        d["local_static"] = bytes.fromhex(d["local_static"])
        d["peer_static"] = bytes.fromhex(d["peer_static"])
        d["stun"] = tuple(d["stun"]) if d.get("stun") else None
        d["turn"] = TurnServer(**d["turn"]) if d.get("turn") else None
        d["exclude_interfaces"] = tuple(d.get("exclude_interfaces") or ())
        return cls(**d)


# -- agent -> pool process --------------------------------------------------------
# {"kind": "open", "spec": LinkSpec.to_json()}
# {"kind": "close", "link_id": str, "reason": str, "notify_peer": bool}
# {"kind": "signal", "link_id": str, "type": "link_offer"|"link_answer"|"link_close"|"link_restart", "payload": {...}}
# {"kind": "stats", "req": int}
# {"kind": "rekey", "link_id": str}            (tests and operators: rekey now)
# {"kind": "exit"}
# -- pool process -> agent --------------------------------------------------------
# {"kind": "signal", "link_id", "peer_id", "type", "payload"}   relay to the peer
# {"kind": "up", "link_id", "peer_id", "tap", "path", "local", "remote", "attempt"}
# {"kind": "down", "link_id", "peer_id", "tap", "reason"}
# {"kind": "closed", "link_id", "tap"}           the TAP is gone
# {"kind": "stats", "req", "links": [ {...}, ... ]}
# {"kind": "error", "link_id", "error"}


@dataclass(frozen=True)
class Event:
    """What the pool reports to the agent: kind is signal | up | down | closed | error | pool_restart."""
    kind: str
    link_id: str
    data: dict[str, Any]


def encode(msg: dict) -> bytes:
    b = json.dumps(msg, separators=(",", ":")).encode()
    return struct.pack("!I", len(b)) + b


async def read_msg(reader: asyncio.StreamReader) -> dict | None:
    """Next message, or None at end of stream. A frame too big or not JSON is an error."""
    try:
        hdr = await reader.readexactly(4)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    (n,) = struct.unpack("!I", hdr)
    if n > MAX_FRAME:
        raise ValueError(f"channel frame of {n} bytes exceeds {MAX_FRAME}")
    try:
        body = await reader.readexactly(n)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    msg = json.loads(body)
    if not isinstance(msg, dict) or "kind" not in msg:
        raise ValueError("channel message without a kind")
    return msg
