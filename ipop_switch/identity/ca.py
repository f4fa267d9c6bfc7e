"""A GroupVPN certificate authority: create the group, issue node certificates, revoke them.

Layout of a group directory (on the admin's machine, never on every node):
    ca.key      Ed25519 CA key, 0600
    ca.crt      the group CA certificate (distributed to every member)
    group.toml  the group config: name, overlay, CA fingerprint, signaling room
    crl.pem     the current revocation list (distributed to every member)
    issued/     one PEM per issued certificate, named <serial hex>.crt (the index for revoke)
    revoked.txt serial hex per line, the source of crl.pem
"""

from __future__ import annotations

import datetime as dt
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from .certs import (IdentityError, check_overlay_name, fingerprint, load_cert_pem, node_id_for, node_id_of, overlay_extension,
                    tunnel_extension, tunnel_public_of, utcnow)
from .files import load_private, private_pem, read_file, write_file

PEM = serialization.Encoding.PEM
NODE_DAYS = 365
CA_DAYS = 3650
CRL_DAYS = 30  # members treat an older CRL as still valid (it only ever grows); re-sign to refresh


@dataclass
class GroupCA:
    dir: Path
    name: str
    key: ed25519.Ed25519PrivateKey
    cert: x509.Certificate

    # -- creation and loading --------------------------------------------------------
    @classmethod
    def create(cls, dirpath: Path, name: str, *, force: bool = False, days: int = CA_DAYS) -> "GroupCA":
        check_overlay_name(name)
        dirpath = Path(dirpath)
        if (dirpath / "ca.key").exists() and not force:
            raise IdentityError(f"a group CA already exists in {dirpath}; refusing to overwrite it (use --force)")
        key = ed25519.Ed25519PrivateKey.generate()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ipop-switch group {name}"),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, name)])
        now = utcnow()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(overlay_extension(name), critical=False)
            .sign(key, None)
        )
        write_file(dirpath / "ca.key", private_pem(key), private=True)
        write_file(dirpath / "ca.crt", cert.public_bytes(PEM), private=False)
        write_file(dirpath / "revoked.txt", b"", private=False)
        (dirpath / "issued").mkdir(exist_ok=True)
        for old in (dirpath / "issued").glob("*.crt"):  # --force: a new CA, a new history
            old.unlink()
        write_file(dirpath / "group.toml", _group_toml(name, fingerprint(cert)).encode(), private=False)
        ca = cls(dirpath, name, key, cert)
        ca.write_crl()
        return ca

    @classmethod
    def load(cls, dirpath: Path) -> "GroupCA":
        dirpath = Path(dirpath)
        try:
            conf = tomllib.loads(read_file(dirpath / "group.toml", "group config").decode())
            name = check_overlay_name(conf["group"]["name"])
        except (tomllib.TOMLDecodeError, KeyError, TypeError) as e:
            raise IdentityError(f"{dirpath / 'group.toml'}: bad group config ({e})") from None
        key = load_private(dirpath / "ca.key", "group CA key", ed25519.Ed25519PrivateKey)
        cert = load_cert_pem(read_file(dirpath / "ca.crt", "group CA certificate"), str(dirpath / "ca.crt"))
        return cls(dirpath, name, key, cert)

    # -- issuing ---------------------------------------------------------------------------
    def issue(self, request: x509.CertificateSigningRequest, *, days: int = NODE_DAYS,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> x509.Certificate:
        """Sign a node's request. The request must be self-signed by the key it names and carry a
        node id and a tunnel key; the issued certificate is bound to this group's overlay."""
        if not isinstance(request.public_key(), ed25519.Ed25519PublicKey):
            raise IdentityError("node request: the key must be Ed25519")
        if not request.is_signature_valid:
            raise IdentityError("node request: its signature is invalid (not made by the key it names)")
        node_id = node_id_of(request.subject)
        if node_id is None:
            raise IdentityError("node request: no valid node id (UID) in its subject")
        tunnel = tunnel_public_of(request.extensions)
        if tunnel is None:
            raise IdentityError("node request: no X25519 tunnel key in it")
        if node_id != node_id_for(request.public_key()):
            raise IdentityError(f"node request: node id {node_id} is not the one its key owns "
                                f"({node_id_for(request.public_key())}): refused (a request may not take another node's id)")
        now = utcnow()
        nb = not_before or now - dt.timedelta(minutes=5)
        na = not_after or now + dt.timedelta(days=days)
        na = min(na, self.cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(request.subject).issuer_name(self.cert.subject)
            .public_key(request.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb).not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .add_extension(overlay_extension(self.name), critical=False)
            .add_extension(tunnel_extension(tunnel), critical=False)
            .sign(self.key, None)
        )
        write_file(self.dir / "issued" / f"{cert.serial_number:x}.crt", cert.public_bytes(PEM), private=False)
        return cert

    # -- revocation -------------------------------------------------------------------------
    def revoked_serials(self) -> list[int]:
        text = (self.dir / "revoked.txt").read_text() if (self.dir / "revoked.txt").exists() else ""
        return [int(l.strip(), 16) for l in text.splitlines() if l.strip()]

    def revoke(self, what: str) -> list[int]:
        """Revoke by serial (hex) or by node id (every certificate issued to it). Returns the serials."""
        what = what.strip().lower()
        serials: list[int] = []
        for path in sorted((self.dir / "issued").glob("*.crt")):
            cert = load_cert_pem(path.read_bytes(), str(path))
            if node_id_of(cert.subject) == what or f"{cert.serial_number:x}" == what.removeprefix("0x"):
                serials.append(cert.serial_number)
        if not serials:
            raise IdentityError(f"no certificate issued by group {self.name} has serial or node id {what!r}")
        known = self.revoked_serials()
        new = known + [s for s in serials if s not in known]
        write_file(self.dir / "revoked.txt", "".join(f"{s:x}\n" for s in new).encode(), private=False)
        self.write_crl()
        return serials

    def crl(self) -> x509.CertificateRevocationList:
        now = utcnow()
        serials = self.revoked_serials()
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - dt.timedelta(minutes=1))
            .next_update(now + dt.timedelta(days=CRL_DAYS))
            .add_extension(x509.CRLNumber(len(serials) + 1), critical=False)
        )
        for s in serials:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build())
        return b.sign(self.key, None)

    def write_crl(self) -> Path:
        path = self.dir / "crl.pem"
        write_file(path, self.crl().public_bytes(PEM), private=False)
        return path

    def bundle(self, cert: x509.Certificate) -> bytes:
        """What a node needs to join: its certificate, the CA certificate and the current CRL."""
        return cert.public_bytes(PEM) + self.cert.public_bytes(PEM) + self.crl().public_bytes(PEM)


def _group_toml(name: str, ca_fp: str) -> str:
    return (f'# ipop-switch group config, made by "ipop-switch group create"\n'
            f'[group]\nname = "{name}"\noverlay = "{name}"\nca_fingerprint = "{ca_fp}"\n\n'
            f'[signaling]\n# the MUC room every member joins (on the XMPP server\'s conference component)\n'
            f'room = "ipsw-{name.lower()}"\n')
