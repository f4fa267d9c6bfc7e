"""Security review, findings 1 (high) and 8 (low) of the identity part.

Finding 1: one member could take over another's identity.

A group admin who signed a request carrying a victim's (public) node id under another key
gave the requester the victim's place: receivers replaced the victim's keys and address,
and the agents linked to the attacker under the victim's id. Node ids are now derived from
the signing key, and the CA, the verifier and the identity store all check it.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ipop_switch.identity.ca import GroupCA
from ipop_switch.identity.certs import (IdentityError, fingerprint, make_request, node_id_for, node_subject, overlay_extension,
                                        tunnel_extension)
from ipop_switch.identity.store import NodeIdentity
from ipop_switch.identity.verify import CertRejected

DER = serialization.Encoding.DER


@pytest.fixture
def group(tmp_path) -> GroupCA:
    return GroupCA.create(tmp_path / "ca", "blue")


def member(group: GroupCA, d) -> NodeIdentity:
    ident = NodeIdentity.create(d)
    ident.install(group.bundle(group.issue(ident.request())))
    return ident


def test_a_node_id_is_the_one_its_signing_key_owns(tmp_path):
    ident = NodeIdentity.create(tmp_path / "a")
    assert ident.node_id == node_id_for(ident.signing_key.public_key())
    assert NodeIdentity.load(tmp_path / "a").node_id == ident.node_id


def test_the_ca_refuses_a_request_for_another_nodes_id(group, tmp_path):
    victim = member(group, tmp_path / "victim")
    attacker_key = ed25519.Ed25519PrivateKey.generate()
    csr = make_request(attacker_key, victim.node_id, "victim", b"\x02" * 32)
    issued = sorted((group.dir / "issued").glob("*.crt"))
    with pytest.raises(IdentityError, match="not the one its key owns"):
        group.issue(csr)
    assert sorted((group.dir / "issued").glob("*.crt")) == issued


def test_a_certificate_naming_another_nodes_id_is_rejected_by_every_receiver(group, tmp_path):
    """Even one the CA's key signed (an old CA, or a CA tool other than ours)."""
    victim, receiver = member(group, tmp_path / "victim"), member(group, tmp_path / "receiver")
    attacker_key = ed25519.Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.timezone.utc)
    forged = (x509.CertificateBuilder().subject_name(node_subject(victim.node_id, "victim"))
              .issuer_name(group.cert.subject).public_key(attacker_key.public_key()).serial_number(99)
              .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(overlay_extension("blue"), critical=False)
              .add_extension(tunnel_extension(b"\x02" * 32), critical=False).sign(group.key, None))
    verifier = receiver.membership("blue").verifier
    with pytest.raises(CertRejected) as e:
        verifier.verify(forged.public_bytes(DER))
    assert e.value.reason == "bad_cert"
    # the real victim still verifies, under its own key
    real = victim.membership("blue").own
    assert verifier.verify(real.cert_der).signing_public_key == victim.signing_key.public_key()


def test_an_identity_whose_id_file_was_swapped_does_not_load(tmp_path):
    a, b = NodeIdentity.create(tmp_path / "a"), NodeIdentity.create(tmp_path / "b")
    (tmp_path / "a" / "node_id").write_text(b.node_id + "\n")
    with pytest.raises(IdentityError, match="not derived from this signing key"):
        NodeIdentity.load(tmp_path / "a")
    assert a.node_id != b.node_id


# -- finding 8 (low): CRL rollback and trust-anchor swap -------------------------------------

def test_join_pins_the_groups_ca(group, tmp_path):
    """A bundle from another CA for the same overlay (an attacker's, or a stale admin's) is
    refused once the node trusts a CA for that overlay; --new-ca is the explicit way through."""
    a = member(group, tmp_path / "a")
    rogue = GroupCA.create(tmp_path / "rogue", "blue")
    bundle = rogue.bundle(rogue.issue(a.request()))
    with pytest.raises(IdentityError, match="not the CA this node trusts"):
        a.install(bundle)
    assert fingerprint(a.membership("blue").verifier.ca) == fingerprint(group.cert)     # still the real CA
    assert a.install(bundle, new_ca=True) == "blue"


def test_an_older_crl_never_replaces_a_newer_one(group, tmp_path):
    a, b = member(group, tmp_path / "a"), member(group, tmp_path / "b")
    old_bundle = group.bundle(group.issue(a.request()))          # CRL before b's revocation
    group.revoke(b.node_id)
    a.install(group.bundle(group.issue(a.request())))             # the current CRL: b revoked
    b_der = b.membership("blue", self_check=False).own.cert_der
    with pytest.raises(CertRejected):
        a.membership("blue").verifier.verify(b_der)
    # a replayed old bundle would un-revoke b at join ...
    with pytest.raises(IdentityError, match="CRL is older"):
        a.install(old_bundle)
    # ... and an older crl.pem dropped in place is ignored by a running verifier
    verifier = a.membership("blue").verifier
    old_crl = x509.load_pem_x509_crl(old_bundle[old_bundle.index(b"-----BEGIN X509 CRL"):])
    (a.group_dir("blue") / "crl.pem").write_bytes(old_crl.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CertRejected) as e:
        verifier.verify(b_der)
    assert e.value.reason == "revoked"


# -- finding 12 (info): the CA certificate's own constraints and validity, node keyUsage -------

def _self_signed(key, *, ca: bool, cert_sign: bool, days: float = 30, overlay: str = "blue") -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ca")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, cert_sign, True, False, False), critical=True)
            .add_extension(overlay_extension(overlay), critical=False).sign(key, None))


def test_a_ca_certificate_that_is_not_a_ca_is_refused():
    from ipop_switch.identity.verify import GroupVerifier
    k = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(IdentityError, match="not a CA"):
        GroupVerifier(_self_signed(k, ca=False, cert_sign=True), "blue")
    with pytest.raises(IdentityError, match="not a CA"):
        GroupVerifier(_self_signed(k, ca=True, cert_sign=False), "blue")
    GroupVerifier(_self_signed(k, ca=True, cert_sign=True), "blue")


def test_certificates_of_an_expired_ca_are_rejected(group, tmp_path):
    a, b = member(group, tmp_path / "a"), member(group, tmp_path / "b")
    verifier = a.membership("blue").verifier
    b_der = b.membership("blue").own.cert_der
    verifier.verify(b_der)
    # b's certificate is clamped to the CA's end; a moment after the CA's end, the CA itself is out
    with pytest.raises(CertRejected, match="group CA"):
        verifier.verify(b_der, now=group.cert.not_valid_after_utc + dt.timedelta(seconds=1))
