"""SocialVPN identity without anything running: the node's self-signed certificate (made once,
kept, remade only for another key or name) and its verifier (no CA: self-signed, this overlay,
node id derived from the key, dates)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ipop_switch.config import ConfigError, OverlayConfig
from ipop_switch.identity import CertRejected, GroupCA, NodeIdentity
from ipop_switch.identity.selfsigned import SelfSignedVerifier, make_self_signed, social_identity

DER = serialization.Encoding.DER


def test_own_certificate_kept_and_verified(tmp_path):
    node = NodeIdentity.create(tmp_path / "n", name="laptop")
    a = social_identity(node, "soc", "laptop")
    b = social_identity(node, "soc", "laptop")
    assert a.own.fingerprint == b.own.fingerprint          # friends pin this: stable
    assert a.own.node_id == node.node_id and a.own.common_name == "laptop"
    assert a.own.tunnel_public == node.tunnel_public()
    assert social_identity(node, "soc", "desk").own.fingerprint != a.own.fingerprint   # renamed: remade
    again = NodeIdentity.create(tmp_path / "n", name="laptop", force=True)              # re-initialised
    assert social_identity(again, "soc", "laptop").own.node_id == again.node_id


def test_verifier_refuses_what_is_not_a_node_own_certificate(tmp_path):
    node = NodeIdentity.create(tmp_path / "n", name="x")
    v = SelfSignedVerifier("soc")
    good = make_self_signed(node, "soc", "x").public_bytes(DER)
    assert v.verify(good).node_id == node.node_id
    with pytest.raises(CertRejected, match="wrong_overlay"):
        v.verify(make_self_signed(node, "other", "x").public_bytes(DER))
    with pytest.raises(CertRejected, match="malformed_cert"):
        v.verify(b"junk")
    # a group certificate (issued by a CA) is not self-signed
    ca = GroupCA.create(tmp_path / "ca", "soc")
    with pytest.raises(CertRejected, match="untrusted_cert"):
        v.verify(ca.issue(node.request()).public_bytes(DER))
    # the subject names another node's id under this key: refused
    other = NodeIdentity.create(tmp_path / "o", name="o")
    cert = make_self_signed(node, "soc", "x")
    forged = (x509.CertificateBuilder().subject_name(make_self_signed(other, "soc", "x").subject)
              .issuer_name(make_self_signed(other, "soc", "x").subject).public_key(node.signing_key.public_key())
              .serial_number(1).not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    for ext in cert.extensions:
        if not isinstance(ext.value, x509.BasicConstraints) and not isinstance(ext.value, x509.KeyUsage):
            forged = forged.add_extension(ext.value, critical=ext.critical)
    with pytest.raises(CertRejected, match="bad_cert"):
        v.verify(forged.sign(node.signing_key, None).public_bytes(DER))
    with pytest.raises(CertRejected, match="expired"):
        v.verify(good, now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=4000))
    # signed by a key that is not the certificate's: refused
    stranger = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(CertRejected, match="untrusted_cert"):
        v.verify(forged.sign(stranger, None).public_bytes(DER))


def _ov(**kw):
    base = {"name": "soc", "kind": "social", "address": "100.80.0.1/16",
            "xmpp": {"server": "x", "jid": "alice@lab", "password": "p"}}
    return OverlayConfig.parse({**base, **kw})


def test_social_config():
    c = _ov(social={"node": "laptop", "addresses": {"bob@lab/pc": "100.80.0.9"}})
    assert c.social.node == "laptop" and c.social.suffix == "ipsw.internal"
    with pytest.raises(ConfigError, match="IPv4 only"):
        _ov(address6="fd00:80::1/64")
    with pytest.raises(ConfigError, match=r"^social\.node: expected str matching regex"):
        _ov(social={"node": "Not A Label"})


def test_config_writer_keeps_the_social_table(tmp_path):
    from ipop_switch.config import load_config
    from ipop_switch.config_writer import write_config
    write_config(tmp_path / "n.toml", {"node": {"identity_dir": tmp_path / "i", "state_dir": tmp_path / "s"},
                                       "overlay": [{"name": "soc", "kind": "social", "address": "100.80.0.1/16",
                                                    "xmpp": {"server": "198.18.0.2", "jid": "alice@lab", "password": "p"},
                                                    "social": {"node": "laptop",
                                                               "addresses": {"bob@lab/desk": "100.80.0.9"}}}]},
                 header="test")
    s = load_config(tmp_path / "n.toml").overlay[0].social
    assert s.node == "laptop" and s.addresses == {"bob@lab/desk": "100.80.0.9"}
