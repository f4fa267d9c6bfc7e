"""The tunnel handshake: Noise_IK_25519_AESGCM_SHA256, exactly as the Noise spec (rev. 34).

    <- s
    ...
    -> e, es, s, ss      (initiation: payload = sender index, timestamp)
    <- e, ee, se         (response:   payload = sender index, receiver index)

Both static X25519 keys are known in advance (bound to the node certificates by
the identity part), so one round trip authenticates both sides and gives session
keys with forward secrecy (ephemeral-ephemeral DH). The prologue binds the
handshake to the link and its ICE session, so a captured initiation cannot be
replayed into another attempt; within one attempt a responder refuses timestamps
that do not grow. Written with `cryptography` only; tested against the
`noiseprotocol` package (tests/test_tunnel_handshake.py).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import codec

PROTOCOL_NAME = b"Noise_IK_25519_AESGCM_SHA256"
DHLEN = 32
HASHLEN = 32


class HandshakeError(Exception):
    """A handshake message failed to authenticate or decode (counted as a drop, never fatal)."""


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def hkdf2(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """Noise HKDF with two outputs (HMAC-SHA256)."""
    temp = _hmac(ck, ikm)
    o1 = _hmac(temp, b"\x01")
    return o1, _hmac(temp, o1 + b"\x02")


def _nonce(n: int) -> bytes:
    return b"\0\0\0\0" + n.to_bytes(8, "big")


def dh(priv: X25519PrivateKey, pub: bytes) -> bytes:
    try:
        return priv.exchange(X25519PublicKey.from_public_bytes(pub))
    except ValueError as e:   # low-order point: all-zero shared secret
        raise HandshakeError(f"bad public key: {e}") from None


def pub_bytes(priv: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    return priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class SymmetricState:
    """Noise SymmetricState + CipherState (AESGCM)."""

    def __init__(self, prologue: bytes) -> None:
        name = PROTOCOL_NAME
        self.h = name.ljust(HASHLEN, b"\0") if len(name) <= HASHLEN else hashlib.sha256(name).digest()
        self.ck = self.h
        self.k: bytes | None = None
        self.n = 0
        self.mix_hash(prologue)

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = hkdf2(self.ck, ikm)
        self.n = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        if self.k is None:
            c = plaintext
        else:
            c = AESGCM(self.k).encrypt(_nonce(self.n), plaintext, self.h)
            self.n += 1
        self.mix_hash(c)
        return c

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        if self.k is None:
            p = ciphertext
        else:
            try:
                p = AESGCM(self.k).decrypt(_nonce(self.n), ciphertext, self.h)
            except InvalidTag:
                raise HandshakeError("handshake message does not authenticate") from None
            self.n += 1
        self.mix_hash(ciphertext)
        return p

    def split(self) -> tuple[bytes, bytes]:
        return hkdf2(self.ck, b"")


@dataclass
class SessionKeys:
    """Result of a handshake: the two transport keys and the indices that route packets."""
    send_key: bytes
    recv_key: bytes
    local_index: int
    remote_index: int
    handshake_hash: bytes


def prologue_for(link_id: str, ufrag_controlling: str, ufrag_controlled: str) -> bytes:
    """Binds a handshake to one link and one ICE session (both sides compute the same bytes).
    v2: the handshake datagrams carry mac1 (admission.py); a v1 peer's do not authenticate."""
    return b"ipop-switch tunnel v2\0" + "\0".join((link_id, ufrag_controlling, ufrag_controlled)).encode()


class Initiator:
    """The side that sends message 1 (the ICE-controlling node)."""

    def __init__(self, static: X25519PrivateKey, remote_static: bytes, prologue: bytes) -> None:
        self.s = static
        self.rs = remote_static
        self.prologue = prologue

    def initiation(self, sender_index: int, timestamp: int, *, ephemeral: X25519PrivateKey | None = None) -> bytes:
        st = SymmetricState(self.prologue)
        st.mix_hash(self.rs)
        self.e = ephemeral or X25519PrivateKey.generate()
        e_pub = pub_bytes(self.e)
        st.mix_hash(e_pub)
        st.mix_key(dh(self.e, self.rs))
        enc_s = st.encrypt_and_hash(pub_bytes(self.s))
        st.mix_key(dh(self.s, self.rs))
        enc_p = st.encrypt_and_hash(struct.pack("<IQ", sender_index, timestamp))
        self.st = st
        self.sender_index = sender_index
        return codec.encode_initiation(codec.Initiation(sender_index, e_pub, enc_s, enc_p))

    def consume_response(self, packet: bytes) -> SessionKeys:
        """Keys from the response, or HandshakeError. Does not change state on failure."""
        m = codec.decode_response(packet)
        if m is None:
            raise HandshakeError("malformed response")
        if m.receiver != self.sender_index:
            raise HandshakeError("response for another handshake")
        st = SymmetricState.__new__(SymmetricState)
        st.__dict__.update(self.st.__dict__)           # work on a copy: a forgery must not spoil the state
        st.mix_hash(m.ephemeral)
        st.mix_key(dh(self.e, m.ephemeral))
        st.mix_key(dh(self.s, m.ephemeral))
        payload = st.decrypt_and_hash(m.enc_payload)
        sender, receiver = struct.unpack("<II", payload)
        if sender != m.sender or receiver != self.sender_index:
            raise HandshakeError("response header does not match its payload")
        k1, k2 = st.split()
        return SessionKeys(k1, k2, self.sender_index, sender, st.h)


@dataclass
class ReceivedInitiation:
    sender_index: int
    timestamp: int
    st: SymmetricState
    re: bytes


class Responder:
    """The side that answers (the ICE-controlled node). Accepts only the expected peer's static key."""

    def __init__(self, static: X25519PrivateKey, expected_remote_static: bytes, prologue: bytes) -> None:
        self.s = static
        self.s_pub = pub_bytes(static)
        self.expected = expected_remote_static
        self.prologue = prologue

    def consume_initiation(self, packet: bytes) -> ReceivedInitiation:
        m = codec.decode_initiation(packet)
        if m is None:
            raise HandshakeError("malformed initiation")
        st = SymmetricState(self.prologue)
        st.mix_hash(self.s_pub)
        st.mix_hash(m.ephemeral)
        st.mix_key(dh(self.s, m.ephemeral))
        rs = st.decrypt_and_hash(m.enc_static)
        if not hmac.compare_digest(rs, self.expected):
            raise HandshakeError("initiation from an unexpected static key")
        st.mix_key(dh(self.s, rs))
        payload = st.decrypt_and_hash(m.enc_payload)
        sender, ts = struct.unpack("<IQ", payload)
        if sender != m.sender:
            raise HandshakeError("initiation header does not match its payload")
        return ReceivedInitiation(sender, ts, st, m.ephemeral)

    def response(self, got: ReceivedInitiation, sender_index: int, *,
                 ephemeral: X25519PrivateKey | None = None) -> tuple[bytes, SessionKeys]:
        st = got.st
        e = ephemeral or X25519PrivateKey.generate()
        e_pub = pub_bytes(e)
        st.mix_hash(e_pub)
        st.mix_key(dh(e, got.re))
        st.mix_key(dh(e, self.expected))
        enc_p = st.encrypt_and_hash(struct.pack("<II", sender_index, got.sender_index))
        k1, k2 = st.split()
        pkt = codec.encode_response(codec.Response(sender_index, got.sender_index, e_pub, enc_p))
        return pkt, SessionKeys(k2, k1, sender_index, got.sender_index, st.h)


def new_index() -> int:
    """A random 32-bit session index (routes data packets to a session; not secret)."""
    return int.from_bytes(os.urandom(4), "little")
