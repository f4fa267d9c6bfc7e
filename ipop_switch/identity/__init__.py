"""Node identity and GroupVPN trust: keys, node id, certificates, group CA, revocation.

Knows nothing of XMPP, links or OVS. Used by signaling (sign/verify) and the agent
(tunnel keys of verified peers).
"""

from .ca import GroupCA
from .certs import IdentityError, fingerprint
from .store import DEFAULT_DIR, NodeIdentity, OverlayIdentity
from .verify import CertRejected, GroupVerifier, PeerVerifier, VerifiedPeer

__all__ = ["GroupCA", "IdentityError", "fingerprint", "DEFAULT_DIR", "NodeIdentity", "OverlayIdentity",
           "CertRejected", "GroupVerifier", "PeerVerifier", "VerifiedPeer"]
