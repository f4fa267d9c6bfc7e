"""Sealed message bodies: encrypted end to end to the recipient's certified tunnel key.

The XMPP server relays every message, and link offers and answers carry ICE credentials
and candidates: in the clear, a server could send valid STUN checks and steer a link's
selected pair to an address it controls (security review, finding 4). So every body but
the announce (which carries only the certificate) travels sealed:

    body = {"sealed": BASE64(epk[32] || AES-256-GCM(key, nonce 0, JSON of the payload))}
    key  = HKDF-SHA256(X25519(e, recipient's tunnel key), salt = epk || recipient key,
                       info = CONTEXT || overlay || sender id || recipient id || type)

A fresh ephemeral key per message makes the key unique, so a fixed nonce is safe. The
envelope around it is still signed by the sender, so the seal adds confidentiality and
the signature keeps authenticity; the info binds the ciphertext to the envelope's
overlay, parties and type, so it cannot be moved into another message.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CONTEXT = b"ipop-switch sealed body v1\x00"
FIELD = "sealed"
OVERHEAD = 32 + 16                       # ephemeral key + tag
_NONCE = bytes(12)


class SealError(Exception):
    """A sealed body that does not open: not for us, altered, or malformed."""


def _key(shared: bytes, epk: bytes, recipient: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=epk + recipient, info=CONTEXT + info).derive(shared)


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def info_of(overlay: str, sender: str, recipient: str, msg_type: str) -> bytes:
    return "\x00".join((overlay, sender, recipient, msg_type)).encode()


def seal(plaintext: bytes, recipient_public: bytes, info: bytes) -> dict:
    """The sealed body of ``plaintext`` for the holder of ``recipient_public`` (raw X25519)."""
    e = X25519PrivateKey.generate()
    epk = _raw(e.public_key())
    key = _key(e.exchange(X25519PublicKey.from_public_bytes(recipient_public)), epk, recipient_public, info)
    return {FIELD: base64.b64encode(epk + AESGCM(key).encrypt(_NONCE, plaintext, None)).decode()}


def unseal(body: dict, own: X25519PrivateKey, info: bytes) -> bytes:
    """The plaintext of a sealed body; SealError if it is not one or does not open."""
    blob = body.get(FIELD) if isinstance(body, dict) and len(body) == 1 else None
    if not isinstance(blob, str):
        raise SealError("not a sealed body")
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise SealError("not base64") from None
    if len(raw) < OVERHEAD:
        raise SealError("too short")
    epk, ct = raw[:32], raw[32:]
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(epk))
    except ValueError:                   # a low-order point: the shared secret is all zero
        raise SealError("bad ephemeral key") from None
    try:
        return AESGCM(_key(shared, epk, _raw(own.public_key()), info)).decrypt(_NONCE, ct, None)
    except InvalidTag:
        raise SealError("does not open (not for us, or altered)") from None
