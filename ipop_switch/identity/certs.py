"""X.509 pieces of a node identity: compact Ed25519 certificates with our two extensions.

Why X.509 and not a bespoke format: ``cryptography`` builds, parses and signs it,
admins can inspect it with ``openssl x509 -text``, and CRLs come for free.
A node certificate binds, under the group CA's signature:
  subject UID      = the node id (32 hex chars), CN = a human name,
  subject key      = the node's Ed25519 signing key (signs signaling messages),
  ext. overlay     = the overlay (group) name, so a cert of group A is useless in group B,
  ext. tunnel key  = the node's X25519 static public key (tunnel handshake).
The extension OIDs live under 2.25.<UUID> (ITU-T X.667: UUID-based OIDs need no
registration), so they never collide with anyone else's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from ..errors import IpopError

_ARC = "2.25.246417216312097328125416412473357129217"  # UUID b9623ac5-26ec-9750-36a8-12c2ec525601
OID_OVERLAY = x509.ObjectIdentifier(_ARC + ".1")
OID_TUNNEL_KEY = x509.ObjectIdentifier(_ARC + ".2")

NODE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
OVERLAY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class IdentityError(IpopError):
    """A certificate, key or identity file is missing or unusable."""


def check_overlay_name(name: str) -> str:
    if not OVERLAY_RE.match(name):
        raise IdentityError(f"bad overlay/group name {name!r}: use 1-63 letters, digits, '.', '_' or '-'")
    return name


# -- minimal DER for our two extension values (an X.509 extnValue must be DER) --------
def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(ln)]) + ln + body


def _un_der(tag: int, data: bytes) -> bytes:
    if len(data) < 2 or data[0] != tag:
        raise ValueError("unexpected DER tag")
    n, off = data[1], 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 2 or len(data) < 2 + k:
            raise ValueError("bad DER length")
        n, off = int.from_bytes(data[2:2 + k], "big"), 2 + k
    if len(data) != off + n:
        raise ValueError("DER length mismatch")
    return data[off:]


def overlay_extension(overlay: str) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(OID_OVERLAY, _der(0x0C, overlay.encode()))  # UTF8String


def tunnel_extension(tunnel_public: bytes) -> x509.UnrecognizedExtension:
    if len(tunnel_public) != 32:
        raise ValueError("X25519 public key must be 32 bytes")
    return x509.UnrecognizedExtension(OID_TUNNEL_KEY, _der(0x04, tunnel_public))  # OCTET STRING


def _ext_value(exts: x509.Extensions, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        ext = exts.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    val = ext.value
    return val.value if isinstance(val, x509.UnrecognizedExtension) else None


def cert_overlay(cert: x509.Certificate) -> str | None:
    raw = _ext_value(cert.extensions, OID_OVERLAY)
    try:
        return _un_der(0x0C, raw).decode() if raw is not None else None
    except (ValueError, UnicodeDecodeError):
        return None


def tunnel_public_of(exts: x509.Extensions) -> bytes | None:
    raw = _ext_value(exts, OID_TUNNEL_KEY)
    try:
        key = _un_der(0x04, raw) if raw is not None else None
    except ValueError:
        return None
    return key if key is not None and len(key) == 32 else None


def name_attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    attrs = name.get_attributes_for_oid(oid)
    return str(attrs[0].value) if attrs else None


def node_id_for(key: ed25519.Ed25519PublicKey) -> str:
    """The node id a signing key owns: the first 16 bytes of SHA-256 of the raw Ed25519 key, hex.

    Derived, not chosen, so that no certificate can name another node's id with its own
    key: a CA that signs a request for a victim's (public) id under another key would
    otherwise hand the victim's place in the overlay to whoever asked (review finding 1)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(b"ipop-switch node id\0" + raw).hexdigest()[:32]


def node_id_of(name: x509.Name) -> str | None:
    nid = name_attr(name, NameOID.USER_ID)
    return nid if nid and NODE_ID_RE.match(nid) else None


def node_subject(node_id: str, common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or node_id),
        x509.NameAttribute(NameOID.USER_ID, node_id),
    ])


def make_request(signing_key: ed25519.Ed25519PrivateKey, node_id: str, common_name: str,
                 tunnel_public: bytes) -> x509.CertificateSigningRequest:
    """A CSR the group admin signs: proves possession of the signing key, carries the tunnel key."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(node_subject(node_id, common_name))
        .add_extension(tunnel_extension(tunnel_public), critical=False)
        .sign(signing_key, None)
    )


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, hex with colons every 4 chars (for humans comparing)."""
    h = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return ":".join(h[i:i + 4] for i in range(0, 64, 4))


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def load_cert_pem(data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise IdentityError(f"{what}: not a PEM certificate ({e})") from None
