"""Security review, finding 1 (high): one member could take over another's identity.

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
from ipop_switch.identity.certs import (IdentityError, make_request, node_id_for, node_subject, overlay_extension,
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
