"""SocialVPN identity: the node's own self-signed certificate (no CA), and its verifier.

In a SocialVPN nobody issues certificates: each node signs its own, with the same contents
as a group certificate (node id derived from the Ed25519 key, the X25519 tunnel key, the
overlay name), so signaling and the tunnel use it exactly as in a GroupVPN. What makes a
peer trusted is not this verifier (any key can sign itself) but the pin of the friend's node
(``social/pins.py``, trust on first use, checked by the agent's discovery with the JID the
announce came from). The certificate is made once and kept, so its fingerprint -- what
friends pin and compare out of band -- changes only with the node's key.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .certs import (IdentityError, check_overlay_name, fingerprint, node_subject, overlay_extension, tunnel_extension,
                    utcnow)
from .files import write_file
from .store import NodeIdentity, OverlayIdentity
from .verify import CertRejected, StaticChecks, VerifiedPeer, check_dates, node_peer, parse_cert

PEM = serialization.Encoding.PEM
SOCIAL_DAYS = 3650  # the pin is the trust: the certificate's dates only bound a stolen one's life


def social_dir(node: NodeIdentity, overlay: str) -> Path:
    return node.dir / "social" / check_overlay_name(overlay)


def make_self_signed(node: NodeIdentity, overlay: str, name: str, *, days: int = SOCIAL_DAYS) -> x509.Certificate:
    now = utcnow()
    key = node.signing_key
    return (
        x509.CertificateBuilder()
        .subject_name(node_subject(node.node_id, name)).issuer_name(node_subject(node.node_id, name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(overlay_extension(overlay), critical=False)
        .add_extension(tunnel_extension(node.tunnel_public()), critical=False)
        .sign(key, None)
    )


class SelfSignedVerifier:
    """``PeerVerifier`` for a SocialVPN: a node certificate signed by its own key, for this
    overlay, within its dates, node id derived from the key, with a tunnel key."""

    CACHE = 4096

    def __init__(self, overlay: str) -> None:
        self.overlay = overlay
        self._static = StaticChecks(self._verify_static, self.CACHE)

    def verify(self, cert_der: bytes, *, now: dt.datetime | None = None) -> VerifiedPeer:
        peer = self._static(cert_der)
        check_dates(peer, now or utcnow())
        return peer

    def _verify_static(self, der: bytes) -> VerifiedPeer:
        cert = parse_cert(der)
        if not isinstance(cert.public_key(), ed25519.Ed25519PublicKey):
            raise CertRejected("bad_cert", "needs an Ed25519 key")
        try:
            cert.verify_directly_issued_by(cert)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise CertRejected("untrusted_cert", f"not signed by its own key ({str(e) or 'signature'})") from None
        return node_peer(cert, der, self.overlay)


def social_identity(node: NodeIdentity, overlay: str, name: str) -> OverlayIdentity:
    """The node's identity in a SocialVPN: its self-signed certificate, made on first use and
    kept (remade only if the node's key or name changed, i.e. it is another identity)."""
    d = social_dir(node, overlay)
    path = d / "node.crt"
    verifier = SelfSignedVerifier(overlay)
    own = None
    if path.exists():
        try:
            der = x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)
            own = verifier.verify(der)
            if own.node_id != node.node_id or own.common_name != name or own.tunnel_public != node.tunnel_public():
                own = None
        except (ValueError, CertRejected):
            own = None
    if own is None:
        cert = make_self_signed(node, overlay, name)
        write_file(path, cert.public_bytes(PEM), private=False)
        try:
            own = verifier.verify(cert.public_bytes(serialization.Encoding.DER))
        except CertRejected as e:  # our own fresh certificate: a bug if it does not verify
            raise IdentityError(f"own social certificate for {overlay} unusable: {e}") from None
    return OverlayIdentity(node, overlay, path.read_bytes(), own, verifier)  # type: ignore[arg-type]
