"""The Noise IK handshake: interoperates with an independent implementation (the
`noiseprotocol` package, Noise_IK_25519_AESGCM_SHA256), authenticates both statics,
refuses forgeries, and gives fresh keys each time (forward secrecy needs the ephemerals)."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings, strategies as st
from noise.connection import Keypair, NoiseConnection

from ipop_switch.tunnel import codec, handshake as hs

NAME = b"Noise_IK_25519_AESGCM_SHA256"


def raw(k: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    return k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def nonce(n):
    return b"\0\0\0\0" + n.to_bytes(8, "big")


def reference(initiator: bool, s: X25519PrivateKey, rs: bytes | None, prologue: bytes) -> NoiseConnection:
    n = NoiseConnection.from_name(NAME)
    n.set_keypair_from_private_bytes(Keypair.STATIC, raw(s))
    if rs is not None:
        n.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, rs)
    n.set_prologue(prologue)
    n.set_as_initiator() if initiator else n.set_as_responder()
    n.start_handshake()
    return n


def test_our_initiator_with_reference_responder():
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pro = hs.prologue_for("l1", "uA", "uB")
    ours = hs.Initiator(a, hs.pub_bytes(b), pro)
    pkt = ours.initiation(7, 123456789)
    ref = reference(False, b, None, pro)
    payload = ref.read_message(pkt[8:])                   # the Noise message follows our 8-byte header
    assert struct.unpack("<IQ", payload) == (7, 123456789)
    assert ref.noise_protocol.handshake_state.rs.public_bytes == hs.pub_bytes(a)
    msg2 = ref.write_message(struct.pack("<II", 99, 7))
    keys = ours.consume_response(struct.pack("<B3xII", codec.TYPE_RESP, 99, 7) + msg2)
    assert (keys.local_index, keys.remote_index) == (7, 99)
    # transport keys agree both ways
    ct = ref.encrypt(b"from responder")
    assert AESGCM(keys.recv_key).decrypt(nonce(0), ct, b"") == b"from responder"
    assert ref.decrypt(AESGCM(keys.send_key).encrypt(nonce(0), b"from initiator", b"")) == b"from initiator"
    assert keys.handshake_hash == ref.get_handshake_hash()


def test_reference_initiator_with_our_responder():
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pro = hs.prologue_for("l2", "x", "y")
    ref = reference(True, a, hs.pub_bytes(b), pro)
    msg1 = ref.write_message(struct.pack("<IQ", 5, 42))
    ours = hs.Responder(b, hs.pub_bytes(a), pro)
    got = ours.consume_initiation(struct.pack("<B3xI", codec.TYPE_INIT, 5) + msg1)
    assert (got.sender_index, got.timestamp) == (5, 42)
    pkt, keys = ours.response(got, 77)
    assert struct.unpack("<II", ref.read_message(pkt[12:])) == (77, 5)
    assert ref.decrypt(AESGCM(keys.send_key).encrypt(nonce(0), b"hi", b"")) == b"hi"
    assert AESGCM(keys.recv_key).decrypt(nonce(0), ref.encrypt(b"yo"), b"") == b"yo"


def _handshake(pro_i=b"p", pro_r=b"p", resp_expects=None):
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    i = hs.Initiator(a, hs.pub_bytes(b), pro_i)
    r = hs.Responder(b, resp_expects or hs.pub_bytes(a), pro_r)
    got = r.consume_initiation(i.initiation(1, 1))
    pkt, rk = r.response(got, 2)
    return i.consume_response(pkt), rk


def test_keys_match_and_are_fresh_each_time():
    ik, rk = _handshake()
    assert ik.send_key == rk.recv_key and ik.recv_key == rk.send_key and ik.send_key != ik.recv_key
    ik2, _ = _handshake()
    assert ik2.send_key != ik.send_key


def test_unexpected_static_key_refused():
    with pytest.raises(hs.HandshakeError):
        _handshake(resp_expects=os.urandom(32))


def test_prologue_mismatch_refused():
    """A handshake of another link or ICE session does not authenticate."""
    with pytest.raises(hs.HandshakeError):
        _handshake(pro_i=hs.prologue_for("l", "a", "b"), pro_r=hs.prologue_for("l", "a", "c"))


@settings(max_examples=100)
@given(st.integers(0, hs.codec.INIT_LEN - 1), st.integers(1, 255))
def test_any_modified_initiation_refused(pos, flip):
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pkt = bytearray(hs.Initiator(a, hs.pub_bytes(b), b"p").initiation(3, 9))
    pkt[pos] ^= flip
    with pytest.raises(hs.HandshakeError):
        hs.Responder(b, hs.pub_bytes(a), b"p").consume_initiation(bytes(pkt))


@settings(max_examples=60)
@given(st.integers(0, hs.codec.RESP_LEN - 1), st.integers(1, 255))
def test_any_modified_response_refused_and_state_kept(pos, flip):
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    i = hs.Initiator(a, hs.pub_bytes(b), b"p")
    r = hs.Responder(b, hs.pub_bytes(a), b"p")
    pkt, _ = r.response(r.consume_initiation(i.initiation(3, 9)), 4)
    bad = bytearray(pkt)
    bad[pos] ^= flip
    with pytest.raises(hs.HandshakeError):
        i.consume_response(bytes(bad))
    assert i.consume_response(pkt).remote_index == 4       # a forgery did not spoil the handshake


def test_truncated_messages_refused():
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pkt = hs.Initiator(a, hs.pub_bytes(b), b"p").initiation(3, 9)
    for n in (0, 1, 8, 40, len(pkt) - 1):
        with pytest.raises(hs.HandshakeError):
            hs.Responder(b, hs.pub_bytes(a), b"p").consume_initiation(pkt[:n])
