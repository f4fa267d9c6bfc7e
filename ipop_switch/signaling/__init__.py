"""Signaling: one XMPP session per overlay carrying signed, versioned messages (docs/signaling.md).

Knows nothing of links, tunnels or OVS; the agent relays link messages through it.
"""

from .config import SignalingConfig
from .events import (Event, PeerAppeared, PeerChanged, PeerLeft, PeerMessage, PeerRefreshed, SendFailed,
                     SessionState)
from .protocol import MAX_BODY, NAMESPACE, VERSION
from .session import SendFailedError, SignalingSession
from .xmpp import AuthFailed, ConnectFailed, SignalingError, TlsFailed

__all__ = ["SignalingConfig", "Event", "PeerAppeared", "PeerChanged", "PeerLeft", "PeerMessage", "PeerRefreshed",
           "SendFailed", "SessionState", "MAX_BODY", "NAMESPACE", "VERSION", "SendFailedError", "SignalingSession",
           "AuthFailed", "ConnectFailed", "SignalingError", "TlsFailed"]
