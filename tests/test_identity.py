"""Identity: node keys and files, the group CA, issuing, revocation and the peer verifier; the CLI."""

from __future__ import annotations

import datetime as dt
import json
import stat

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from ipop_switch.cli import cli
from ipop_switch.identity import CertRejected, GroupCA, IdentityError, NodeIdentity
from ipop_switch.identity.certs import overlay_extension, tunnel_extension, tunnel_public_of, node_subject

DER = serialization.Encoding.DER


@pytest.fixture
def group(tmp_path):
    return GroupCA.create(tmp_path / "ca", "blue")


def member(ca: GroupCA, path, **kw) -> NodeIdentity:
    n = NodeIdentity.create(path, name=path.name)
    n.install(ca.bundle(ca.issue(n.request(), **kw)))
    return n


def der_of(ident: NodeIdentity, overlay="blue") -> bytes:
    return x509.load_pem_x509_certificate((ident.group_dir(overlay) / "node.crt").read_bytes()).public_bytes(DER)


def test_init_makes_private_files_and_refuses_to_overwrite(tmp_path):
    n = NodeIdentity.create(tmp_path / "n", name="alice")
    assert len(n.node_id) == 32 and int(n.node_id, 16) >= 0
    for f in ("signing.key", "tunnel.key"):
        assert stat.S_IMODE((tmp_path / "n" / f).stat().st_mode) == 0o600
    with pytest.raises(IdentityError, match="refusing to overwrite"):
        NodeIdentity.create(tmp_path / "n")
    again = NodeIdentity.load(tmp_path / "n")
    assert again.node_id == n.node_id and again.tunnel_private_bytes() == n.tunnel_private_bytes()
    forced = NodeIdentity.create(tmp_path / "n", force=True)
    assert forced.node_id != n.node_id


def test_loose_key_permissions_are_refused(tmp_path):
    NodeIdentity.create(tmp_path / "n")
    (tmp_path / "n" / "signing.key").chmod(0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        NodeIdentity.load(tmp_path / "n")


def test_issued_certificate_binds_node_id_overlay_and_tunnel_key(group, tmp_path):
    n = member(group, tmp_path / "alice")
    m = n.membership("blue")
    assert m.node_id == n.node_id and m.own.overlay == "blue"
    assert m.own.subject == f"UID={n.node_id},CN=alice"
    assert m.own.tunnel_public == x25519.X25519PrivateKey.from_private_bytes(m.tunnel_private_bytes()).public_key() \
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(m.cert_der) < 700  # compact: Ed25519
    sig = m.sign(b"hello")
    assert m.own.verify_signature(sig, b"hello") and not m.own.verify_signature(sig, b"hellO")
    assert n.overlays() == ["blue"]


def test_verifier_rejects_other_ca_expired_future_revoked_and_ca_certs(group, tmp_path):
    good = member(group, tmp_path / "good")
    v = good.membership("blue").verifier
    assert v.verify(der_of(good)).node_id == good.node_id

    other = GroupCA.create(tmp_path / "other", "blue")
    stranger = member(other, tmp_path / "stranger")
    with pytest.raises(CertRejected) as e:
        v.verify(der_of(stranger))
    assert e.value.reason == "untrusted_cert"

    now = dt.datetime.now(dt.timezone.utc)
    old = NodeIdentity.create(tmp_path / "old")
    cert = group.issue(old.request(), not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(days=1))
    with pytest.raises(CertRejected) as e:
        v.verify(cert.public_bytes(DER))
    assert e.value.reason == "expired"
    cert = group.issue(old.request(), not_before=now + dt.timedelta(days=1))
    with pytest.raises(CertRejected) as e:
        v.verify(cert.public_bytes(DER))
    assert e.value.reason == "not_yet_valid"
    # a date inside the validity is fine: dates are checked per call, not cached
    assert v.verify(cert.public_bytes(DER), now=now + dt.timedelta(days=2)).node_id == old.node_id

    with pytest.raises(CertRejected) as e:
        v.verify(group.cert.public_bytes(DER))
    assert e.value.reason == "bad_cert"

    with pytest.raises(CertRejected) as e:
        v.verify(b"\x30\x03junk")
    assert e.value.reason == "malformed_cert"


def test_revocation_is_seen_when_the_crl_file_changes(group, tmp_path):
    a, b = member(group, tmp_path / "a"), member(group, tmp_path / "b")
    v = a.membership("blue").verifier
    assert v.verify(der_of(b))
    assert group.revoke(b.node_id)
    assert v.verify(der_of(b))                       # a has not received the new CRL yet
    (a.group_dir("blue") / "crl.pem").write_bytes((group.dir / "crl.pem").read_bytes())
    with pytest.raises(CertRejected) as e:
        v.verify(der_of(b))
    assert e.value.reason == "revoked"
    assert v.verify(der_of(a)).node_id == a.node_id  # the others stay valid


def test_crl_not_signed_by_the_group_ca_is_ignored(group, tmp_path):
    a, b = member(group, tmp_path / "a"), member(group, tmp_path / "b")
    other = GroupCA.create(tmp_path / "other", "blue")
    # another CA "revoking" b's serial: must not count
    serial = x509.load_der_x509_certificate(der_of(b)).serial_number
    (other.dir / "revoked.txt").write_text(f"{serial:x}\n")
    (a.group_dir("blue") / "crl.pem").write_bytes(other.crl().public_bytes(serialization.Encoding.PEM))
    assert a.membership("blue").verifier.verify(der_of(b)).node_id == b.node_id


def test_wrong_overlay_certificate_from_the_same_ca_is_rejected(group, tmp_path):
    """A certificate signed by the group's CA key but naming another overlay."""
    a = member(group, tmp_path / "a")
    k = ed25519.Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(node_subject("ab" * 16, "x")).issuer_name(group.cert.subject)
            .public_key(k.public_key()).serial_number(7).not_valid_before(now).not_valid_after(now + dt.timedelta(1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(overlay_extension("red"), critical=False)
            .add_extension(tunnel_extension(b"\x01" * 32), critical=False).sign(group.key, None))
    with pytest.raises(CertRejected) as e:
        a.membership("blue").verifier.verify(cert.public_bytes(DER))
    assert e.value.reason == "wrong_overlay"


def test_install_refuses_a_bundle_for_someone_else(group, tmp_path):
    a = NodeIdentity.create(tmp_path / "a")
    b = NodeIdentity.create(tmp_path / "b")
    bundle = group.bundle(group.issue(b.request()))
    with pytest.raises(IdentityError, match="is for node"):
        a.install(bundle)
    with pytest.raises(IdentityError):
        a.install(b"garbage")


def test_request_must_carry_node_id_and_tunnel_key(group):
    k = ed25519.Ed25519PrivateKey.generate()
    csr = x509.CertificateSigningRequestBuilder().subject_name(node_subject("cd" * 16, "x")).sign(k, None)
    with pytest.raises(IdentityError, match="tunnel key"):
        group.issue(csr)
    assert tunnel_public_of(csr.extensions) is None


def test_cli_init_group_issue_join_revoke(tmp_path):
    r = CliRunner()
    cfg = tmp_path / "etc" / "node.toml"
    res = r.invoke(cli, ["init", "--dir", str(tmp_path / "n"), "--json", "--name", "alice", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    nid = json.loads(res.output)["node_id"]
    assert json.loads(res.output)["config"] == str(cfg)
    from ipop_switch.config import load_config
    assert load_config(cfg).node.identity_dir == tmp_path / "n"   # the starter config is valid as written
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    res = r.invoke(cli, ["init", "--dir", str(tmp_path / "n"), "--config", str(cfg)])
    assert res.exit_code == 1 and "refusing to overwrite" in res.output
    assert r.invoke(cli, ["group", "create", "blue", "--dir", str(tmp_path / "g")]).exit_code == 0
    res = r.invoke(cli, ["group", "create", "blue", "--dir", str(tmp_path / "g")])
    assert res.exit_code == 1 and "refusing to overwrite" in res.output
    assert stat.S_IMODE((tmp_path / "g" / "blue" / "ca.key").stat().st_mode) == 0o600
    out = tmp_path / "b.pem"
    res = r.invoke(cli, ["group", "issue", str(tmp_path / "n" / "node.csr"), "--group", "blue", "--dir",
                         str(tmp_path / "g"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    res = r.invoke(cli, ["group", "join", str(out), "--dir", str(tmp_path / "n")])
    assert res.exit_code == 0 and "member of blue" in res.output, res.output
    res = r.invoke(cli, ["whoami", "--dir", str(tmp_path / "n"), "--json"])
    who = json.loads(res.output)
    assert who["node_id"] == nid and who["groups"][0]["ok"] and who["groups"][0]["subject"] == f"UID={nid},CN=alice"
    res = r.invoke(cli, ["group", "revoke", "blue", nid, "--dir", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    (tmp_path / "n" / "groups" / "blue" / "crl.pem").write_bytes((tmp_path / "g" / "blue" / "crl.pem").read_bytes())
    who = json.loads(r.invoke(cli, ["whoami", "--dir", str(tmp_path / "n"), "--json"]).output)
    assert not who["groups"][0]["ok"] and "revoked" in who["groups"][0]["error"]
    res = r.invoke(cli, ["group", "revoke", "blue", "ff" * 16, "--dir", str(tmp_path / "g")])
    assert res.exit_code == 1 and "no certificate" in res.output
