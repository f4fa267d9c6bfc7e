"""Turning a peer's certificate into a verified peer, on every use.

GroupVPN trust: a certificate is accepted only if the group CA signed it, it is a node
(not CA) certificate for this overlay, today is within its validity, and its serial is not
on the group's CRL. The expensive part (parsing, the CA signature) is cached by the
certificate's hash; dates and revocation are checked on every call, and the CRL file is
re-read as soon as it changes on disk, so a revocation takes effect without a restart.
SocialVPN trust (``selfsigned.py``) implements the same ``PeerVerifier`` protocol for
self-signed certificates, sharing the node-certificate checks here (``node_peer``); the pin
of the friend's node is what makes it trusted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from .certs import (IdentityError, cert_overlay, fingerprint, name_attr, node_id_for, node_id_of, tunnel_public_of,
                    utcnow)

log = logging.getLogger(__name__)


class CertRejected(Exception):
    """A peer certificate failed a check; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class VerifiedPeer:
    """A peer whose certificate passed every check (at the time of the check)."""

    node_id: str
    subject: str              # RFC 4514 form of the certificate subject
    common_name: str
    overlay: str
    signing_public_key: ed25519.Ed25519PublicKey = field(repr=False)
    tunnel_public: bytes = field(repr=False)  # 32 raw bytes of the X25519 static key
    not_after: dt.datetime
    not_before: dt.datetime
    serial: int
    fingerprint: str
    cert_der: bytes = field(repr=False)

    def verify_signature(self, signature: bytes, data: bytes) -> bool:
        try:
            self.signing_public_key.verify(signature, data)
            return True
        except InvalidSignature:
            return False


def parse_cert(der: bytes) -> x509.Certificate:
    """The certificate, its extensions parsed too (a malformed extension must fail here, not later)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.extensions
    except ValueError as e:
        raise CertRejected("malformed_cert", str(e)) from None
    return cert


def node_peer(cert: x509.Certificate, der: bytes, overlay: str) -> VerifiedPeer:
    """The checks every node certificate passes whoever signed it (group CA or the node itself):
    for this overlay, not a CA, may sign, an Ed25519 key whose id is the node id, a tunnel key."""
    exts = cert.extensions
    ov = cert_overlay(cert)
    if ov != overlay:
        raise CertRejected("wrong_overlay", f"certificate is for overlay {ov!r}, expected {overlay!r}")
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or bc.ca:
        raise CertRejected("bad_cert", "not a node certificate (basic constraints)")
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.digital_signature:
        raise CertRejected("bad_cert", "its key may not sign (keyUsage)")
    pub = cert.public_key()
    node_id, tunnel = node_id_of(cert.subject), tunnel_public_of(exts)
    if not isinstance(pub, ed25519.Ed25519PublicKey) or node_id is None or tunnel is None:
        raise CertRejected("bad_cert", "needs an Ed25519 key, a node id and a tunnel key")
    if node_id != node_id_for(pub):
        raise CertRejected("bad_cert", f"node id {node_id} is not the one its key owns: refused "
                                       "(a certificate may not take another node's id)")
    return VerifiedPeer(
        node_id=node_id, subject=cert.subject.rfc4514_string(),
        common_name=name_attr(cert.subject, NameOID.COMMON_NAME) or "", overlay=ov,
        signing_public_key=pub, tunnel_public=tunnel, not_after=cert.not_valid_after_utc,
        not_before=cert.not_valid_before_utc, serial=cert.serial_number, fingerprint=fingerprint(cert), cert_der=der,
    )


class StaticChecks:
    """What cannot change over a certificate's life (parsing, the issuer's signature, the
    contents), kept by the certificate's hash so a peer's every message costs one lookup;
    least recently used first out."""

    def __init__(self, check: Callable[[bytes], VerifiedPeer], size: int) -> None:
        self._check = check
        self._size = size
        self._done: OrderedDict[bytes, VerifiedPeer] = OrderedDict()

    def __call__(self, der: bytes) -> VerifiedPeer:
        key = hashlib.sha256(der).digest()
        peer = self._done.get(key)
        if peer is None:
            peer = self._done[key] = self._check(der)
            if len(self._done) > self._size:
                self._done.popitem(last=False)
        else:
            self._done.move_to_end(key)
        return peer


def check_dates(peer: VerifiedPeer, now: dt.datetime) -> None:
    if now < peer.not_before:
        raise CertRejected("not_yet_valid", f"node {peer.node_id}: valid only from {peer.not_before:%Y-%m-%d %H:%M}")
    if now > peer.not_after:
        raise CertRejected("expired", f"node {peer.node_id}: expired {peer.not_after:%Y-%m-%d %H:%M}")


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRL's number (0 if it has none): it grows with every revocation."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def _check_ca(ca: x509.Certificate) -> None:
    """A group CA certificate must say it is a CA that signs certificates (review finding 12)."""
    try:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as e:
        raise IdentityError(f"group CA certificate: no {e.oid._name} extension") from None
    if not bc.ca or not ku.key_cert_sign:
        raise IdentityError("group CA certificate: not a CA (basicConstraints) or may not sign certificates (keyUsage)")


class PeerVerifier(Protocol):
    overlay: str

    def verify(self, cert_der: bytes, *, now: dt.datetime | None = None) -> VerifiedPeer: ...


class GroupVerifier:
    """Verifies node certificates against one group CA (and its CRL) for one overlay."""

    CACHE = 1024

    def __init__(self, ca_cert: x509.Certificate, overlay: str, *, crl: x509.CertificateRevocationList | None = None,
                 crl_path: Path | None = None) -> None:
        if not isinstance(ca_cert.public_key(), ed25519.Ed25519PublicKey):
            raise IdentityError("group CA certificate: key is not Ed25519")
        if cert_overlay(ca_cert) not in (None, overlay):
            raise IdentityError(f"group CA certificate is for overlay {cert_overlay(ca_cert)!r}, not {overlay!r}")
        _check_ca(ca_cert)
        self.ca = ca_cert
        self.overlay = overlay
        self.crl_path = Path(crl_path) if crl_path else None
        self._crl_stamp: tuple[int, int] | None = None
        self._revoked: frozenset[int] = frozenset()
        self._crl_number = -1        # the highest CRL number seen: an older CRL never replaces a newer one
        self._static = StaticChecks(self._verify_static, self.CACHE)
        if crl is not None:
            self._set_crl(crl, "given")

    # -- CRL -------------------------------------------------------------------------------
    def _set_crl(self, crl: x509.CertificateRevocationList, origin: str) -> bool:
        if crl.issuer != self.ca.subject or not crl.is_signature_valid(self.ca.public_key()):
            log.warning("CRL %s ignored: not signed by the group CA of %s", origin, self.overlay)
            return False
        number = crl_number(crl)
        if number < self._crl_number:
            log.warning("CRL %s ignored: number %d is older than the one in use (%d)", origin, number, self._crl_number)
            return False
        self._crl_number = number
        self._revoked = frozenset(r.serial_number for r in crl)
        return True

    def _refresh_crl(self) -> None:
        if self.crl_path is None:
            return
        try:
            st = self.crl_path.stat()
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._crl_stamp:
            return
        self._crl_stamp = stamp
        try:
            self._set_crl(x509.load_pem_x509_crl(self.crl_path.read_bytes()), str(self.crl_path))
        except (ValueError, OSError) as e:
            log.warning("CRL %s unreadable, keeping the previous one: %s", self.crl_path, e)

    def is_revoked(self, serial: int) -> bool:
        self._refresh_crl()
        return serial in self._revoked

    # -- certificates ---------------------------------------------------------------------
    def verify(self, cert_der: bytes, *, now: dt.datetime | None = None) -> VerifiedPeer:
        peer = self._static(cert_der)
        self._verify_dynamic(peer, now or utcnow())
        return peer

    def _verify_static(self, der: bytes) -> VerifiedPeer:
        """Everything that cannot change over time: parsing, issuer signature, overlay, contents."""
        cert = parse_cert(der)
        try:
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise CertRejected("untrusted_cert", f"not issued by the group CA of {self.overlay} "
                                                  f"({str(e) or 'CA signature does not verify'})") from None
        return node_peer(cert, der, self.overlay)

    def _verify_dynamic(self, peer: VerifiedPeer, now: dt.datetime) -> None:
        if not self.ca.not_valid_before_utc <= now <= self.ca.not_valid_after_utc:
            raise CertRejected("expired", f"the group CA of {self.overlay} is outside its validity "
                                          f"({self.ca.not_valid_before_utc:%Y-%m-%d} .. {self.ca.not_valid_after_utc:%Y-%m-%d})")
        check_dates(peer, now)
        if self.is_revoked(peer.serial):
            raise CertRejected("revoked", f"node {peer.node_id}: certificate serial {peer.serial:x} is revoked")
