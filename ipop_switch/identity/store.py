"""The node's identity store: keys, persistent node id, and one membership per overlay.

Layout of an identity directory (default /var/lib/ipop-switch):
    node_id            32 hex chars derived from the signing key (certs.node_id_for), never changed
                       (peers, topology and logs key on it)
    signing.key        Ed25519, 0600: signs signaling messages; the certificate's subject key
    tunnel.key         X25519, 0600: static key of the tunnel handshake (bound into the certificate)
    node.csr           the request a group admin signs ("ipop-switch group issue")
    groups/<overlay>/  node.crt, ca.crt, crl.pem: one membership per overlay
"""

from __future__ import annotations

import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from .certs import (NODE_ID_RE, IdentityError, cert_overlay, check_overlay_name, fingerprint, load_cert_pem,
                    make_request, node_id_for, node_id_of)
from .files import load_private, private_pem, read_file, write_file
from .verify import CertRejected, GroupVerifier, VerifiedPeer, crl_number

PEM = serialization.Encoding.PEM
DEFAULT_DIR = Path("/var/lib/ipop-switch")


@dataclass
class NodeIdentity:
    """The node's own keys and node id (independent of any overlay)."""

    dir: Path
    node_id: str
    signing_key: ed25519.Ed25519PrivateKey = field(repr=False)
    tunnel_key: x25519.X25519PrivateKey = field(repr=False)

    @classmethod
    def create(cls, dirpath: Path, *, name: str | None = None, force: bool = False) -> "NodeIdentity":
        dirpath = Path(dirpath)
        if (dirpath / "signing.key").exists() and not force:
            raise IdentityError(f"an identity already exists in {dirpath}; refusing to overwrite it (use --force)")
        dirpath.mkdir(parents=True, exist_ok=True)
        dirpath.chmod(0o700)
        # memberships certify the old keys: useless to a new identity, and their pinned CAs
        # would refuse the new identity's first join
        shutil.rmtree(dirpath / "groups", ignore_errors=True)
        signing = ed25519.Ed25519PrivateKey.generate()
        ident = cls(dirpath, node_id_for(signing.public_key()), signing, x25519.X25519PrivateKey.generate())
        write_file(dirpath / "signing.key", private_pem(ident.signing_key), private=True)
        write_file(dirpath / "tunnel.key", private_pem(ident.tunnel_key), private=True)
        write_file(dirpath / "node_id", (ident.node_id + "\n").encode(), private=False)
        csr = make_request(ident.signing_key, ident.node_id, name or socket.gethostname(), ident.tunnel_public())
        write_file(dirpath / "node.csr", csr.public_bytes(PEM), private=False)
        return ident

    @classmethod
    def load(cls, dirpath: Path) -> "NodeIdentity":
        dirpath = Path(dirpath)
        node_id = read_file(dirpath / "node_id", "node id file (run 'ipop-switch init')").decode().strip()
        if not NODE_ID_RE.match(node_id):
            raise IdentityError(f"{dirpath / 'node_id'}: not a node id (32 lowercase hex chars)")
        signing = load_private(dirpath / "signing.key", "signing key", ed25519.Ed25519PrivateKey)
        if node_id != node_id_for(signing.public_key()):
            raise IdentityError(f"{dirpath}: node id {node_id} is not derived from this signing key (an identity "
                                "made before node ids were derived, or files mixed up): make a new one with "
                                "'ipop-switch init --force' and have it issued again")
        return cls(dirpath, node_id, signing,
                   load_private(dirpath / "tunnel.key", "tunnel key", x25519.X25519PrivateKey))

    def sign(self, data: bytes) -> bytes:
        return self.signing_key.sign(data)

    def tunnel_public(self) -> bytes:
        return self.tunnel_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def tunnel_private_bytes(self) -> bytes:
        return self.tunnel_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                             serialization.NoEncryption())

    def request(self) -> x509.CertificateSigningRequest:
        return x509.load_pem_x509_csr(read_file(self.dir / "node.csr", "node request"))

    # -- memberships ----------------------------------------------------------------------
    def group_dir(self, overlay: str) -> Path:
        return self.dir / "groups" / check_overlay_name(overlay)

    def overlays(self) -> list[str]:
        g = self.dir / "groups"
        return sorted(p.name for p in g.iterdir() if (p / "node.crt").exists()) if g.is_dir() else []

    def install(self, bundle: bytes, *, force: bool = True, new_ca: bool = False) -> str:
        """Install a bundle from 'group issue' (node cert + CA cert + CRL). Checks that the certificate
        is ours and verifies against the CA before writing anything. Returns the overlay.

        The group's CA is pinned at the first join: a bundle of another CA for the same overlay is
        refused unless ``new_ca``, and a bundle whose CRL is older than the installed one is refused
        (a stale or replayed bundle would un-revoke members)."""
        try:
            certs = x509.load_pem_x509_certificates(bundle)
        except ValueError as e:
            raise IdentityError(f"bundle: no certificates in it ({e})") from None
        if len(certs) != 2:
            raise IdentityError(f"bundle: expected 2 certificates (node, CA), found {len(certs)}")
        node_cert, ca_cert = certs
        overlay = cert_overlay(ca_cert)
        if overlay is None:
            raise IdentityError("bundle: the CA certificate names no overlay")
        if node_id_of(node_cert.subject) != self.node_id:
            raise IdentityError(f"bundle: the certificate is for node {node_id_of(node_cert.subject)}, "
                                f"this node is {self.node_id}")
        if node_cert.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo) != \
                self.signing_key.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo):
            raise IdentityError("bundle: the certificate names another signing key than this node's")
        crl_pem = _crl_block(bundle)
        try:
            GroupVerifier(ca_cert, overlay, crl=x509.load_pem_x509_crl(crl_pem) if crl_pem else None).verify(
                node_cert.public_bytes(serialization.Encoding.DER))
        except CertRejected as e:
            raise IdentityError(f"bundle: the certificate does not verify ({e})") from None
        except ValueError as e:
            raise IdentityError(f"bundle: unreadable CRL ({e})") from None
        gdir = self.group_dir(overlay)
        if (gdir / "node.crt").exists() and not force:
            raise IdentityError(f"already a member of {overlay} ({gdir}); use --force to replace")
        if (gdir / "ca.crt").exists() and not new_ca:
            pinned = load_cert_pem((gdir / "ca.crt").read_bytes(), str(gdir / "ca.crt"))
            if fingerprint(pinned) != fingerprint(ca_cert):
                raise IdentityError(f"bundle: its CA ({fingerprint(ca_cert)}) is not the CA this node trusts for "
                                    f"{overlay} ({fingerprint(pinned)}); if the group's CA really changed, "
                                    "join with --new-ca")
        if crl_pem and (gdir / "crl.pem").exists() and not new_ca:
            try:
                installed = crl_number(x509.load_pem_x509_crl((gdir / "crl.pem").read_bytes()))
            except ValueError:
                installed = -1
            if crl_number(x509.load_pem_x509_crl(crl_pem)) < installed:
                raise IdentityError(f"bundle: its CRL is older than the one installed for {overlay} "
                                    f"(number {crl_number(x509.load_pem_x509_crl(crl_pem))} < {installed}): "
                                    "a stale or replayed bundle; ask the admin for a new one")
        write_file(gdir / "node.crt", node_cert.public_bytes(PEM), private=False)
        write_file(gdir / "ca.crt", ca_cert.public_bytes(PEM), private=False)
        if crl_pem:
            write_file(gdir / "crl.pem", crl_pem, private=False)
        return overlay

    def membership(self, overlay: str, *, self_check: bool = True) -> "OverlayIdentity":
        """The identity for one overlay. Our own certificate is verified like a peer's, so an expired
        or revoked node says so at start instead of being silently ignored by everyone
        (``self_check=False`` only for tests that play such a node)."""
        gdir = self.group_dir(overlay)
        cert_pem = read_file(gdir / "node.crt", f"certificate for overlay {overlay} (run 'ipop-switch group join')")
        ca = load_cert_pem(read_file(gdir / "ca.crt", f"CA certificate of overlay {overlay}"), str(gdir / "ca.crt"))
        verifier = GroupVerifier(ca, overlay, crl_path=gdir / "crl.pem")
        der = load_cert_pem(cert_pem, str(gdir / "node.crt")).public_bytes(serialization.Encoding.DER)
        try:
            own = verifier.verify(der)
        except CertRejected as e:
            if self_check:
                raise IdentityError(f"own certificate for {overlay} unusable: {e}") from None
            own = verifier._verify_static(der)
        if own.node_id != self.node_id:
            raise IdentityError(f"{gdir / 'node.crt'} belongs to node {own.node_id}, not to {self.node_id}")
        return OverlayIdentity(self, overlay, cert_pem, own, verifier)


@dataclass
class OverlayIdentity:
    """The own identity as seen in one overlay: what the agent and signaling use."""

    node: NodeIdentity
    overlay: str
    cert_pem: bytes
    own: VerifiedPeer
    verifier: GroupVerifier

    @property
    def node_id(self) -> str:
        return self.node.node_id

    @property
    def cert_der(self) -> bytes:
        return self.own.cert_der

    def sign(self, data: bytes) -> bytes:
        return self.node.sign(data)

    def tunnel_private_bytes(self) -> bytes:
        return self.node.tunnel_private_bytes()


def _crl_block(data: bytes) -> bytes | None:
    m = re.search(rb"-----BEGIN X509 CRL-----.*?-----END X509 CRL-----\n?", data, re.S)
    return m.group(0) if m else None
