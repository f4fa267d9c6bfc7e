"""Events a signaling session reports to its user (the agent): peers and their messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from ..identity import VerifiedPeer


@dataclass(frozen=True)
class PeerAppeared:
    """A member announced itself with a certificate that verified."""
    peer: VerifiedPeer
    caps: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PeerChanged:
    """A known member announced a different certificate (renewed, new keys) or capabilities."""
    peer: VerifiedPeer
    caps: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PeerRefreshed:
    """A known member announced again, unchanged (e.g. after a reconnect): it is reachable again."""
    peer: VerifiedPeer


@dataclass(frozen=True)
class PeerLeft:
    """A member left the room, was not rediscovered after a reconnect, or its certificate stopped
    verifying (reason "expired", "revoked", ...)."""
    node_id: str
    reason: str


@dataclass(frozen=True)
class PeerMessage:
    """A verified message of the application (link_offer, link_answer, link_close, ...)."""
    node_id: str
    type: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class SendFailed:
    """A message to ``node_id`` could not be handed to the server within the queue's bound."""
    node_id: str
    type: str
    reason: str


@dataclass(frozen=True)
class SessionState:
    """The XMPP session went online (joined the overlay's room) or offline."""
    online: bool
    detail: str = ""


Event = Union[PeerAppeared, PeerChanged, PeerRefreshed, PeerLeft, PeerMessage, SendFailed, SessionState]
