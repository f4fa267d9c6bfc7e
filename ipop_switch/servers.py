"""Configs of the signaling servers a group needs: a CA for the XMPP server's TLS
certificate, Prosody's config (XMPP over TLS with a MUC) and coturn's options
(STUN and TURN with long-term credentials).

One place for both users of them: the lab runs these servers in its core namespace,
``ipop-switch deploy`` writes the same configs for a real signaling host.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

XMPP_DOMAIN = "ipsw.test"          # .test is reserved (RFC 2606): never resolves outside
MUC_DOMAIN = f"conference.{XMPP_DOMAIN}"
XMPP_PORT = 5222
TURN_PORT = 3478
TURN_USER = "ipsw"


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def make_server_ca(dirpath: Path, *, addr: str, days: int = 30) -> None:
    """A CA and a server certificate for Prosody (the domain, the MUC and ``addr``) signed by it:
    ``ca.crt`` goes to every node (``xmpp.ca_file``), ``server.*`` to the XMPP server."""
    dirpath.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ipop-switch signaling CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, XMPP_DOMAIN)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName(XMPP_DOMAIN), x509.DNSName(MUC_DOMAIN),
                x509.IPAddress(ipaddress.ip_address(addr)),
            ]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (dirpath / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    _write_private(dirpath / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (dirpath / "server.crt").write_bytes(cert.public_bytes(pem))
    _write_private(dirpath / "server.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def prosody_config(root: Path, ca_dir: Path, addr: str | list[str], *, pidfile: Path, run_as_root: bool) -> str:
    """Prosody's config: c2s on ``addr`` only (or each of a list), TLS required, no registration,
    a MUC component."""
    interfaces = ", ".join(f'"{a}"' for a in ([addr] if isinstance(addr, str) else addr))
    return f'''-- written by ipop-switch
run_as_root = {'true' if run_as_root else 'false'}
daemonize = false
pidfile = "{pidfile}"
data_path = "{root / 'data'}"
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = "{root / 'prosody.log'}" }} }}
interfaces = {{ {interfaces} }}
c2s_ports = {{ {XMPP_PORT} }}
c2s_direct_tls_ports = {{ }}
modules_enabled = {{ "roster", "saslauth", "tls", "disco", "ping", "posix", "presence" }}
modules_disabled = {{ "s2s", "offline", "c2s_direct_tls" }}
c2s_require_encryption = true
authentication = "internal_hashed"
allow_registration = false
storage = "internal"
ssl = {{ certificate = "{ca_dir / 'server.crt'}", key = "{ca_dir / 'server.key'}" }}
VirtualHost "{XMPP_DOMAIN}"
Component "{MUC_DOMAIN}" "muc"
    restrict_room_creation = false
    muc_room_default_public = true
    muc_room_default_persistent = false
    muc_room_locking = false
'''


def coturn_options(*, listen: list[str], relay: str, user: str, password: str,
                   port: int = TURN_PORT, realm: str = XMPP_DOMAIN) -> list[tuple[str, str | None]]:
    """coturn's settings as (option, value) pairs: the lab passes them as ``--option value``,
    deploy writes them as ``option=value`` lines of turnserver.conf."""
    opts: list[tuple[str, str | None]] = [("listening-ip", a) for a in listen]
    opts += [("relay-ip", relay), ("listening-port", str(port)), ("lt-cred-mech", None),
             ("user", f"{user}:{password}"), ("realm", realm), ("fingerprint", None), ("no-tls", None),
             ("no-dtls", None), ("no-cli", None), ("no-multicast-peers", None), ("simple-log", None)]
    return opts


def coturn_argv(opts: list[tuple[str, str | None]]) -> list[str]:
    return [x for k, v in opts for x in ((f"--{k}", v) if v is not None else (f"--{k}",))]


def coturn_conf(opts: list[tuple[str, str | None]]) -> str:
    return "".join(f"{k}={v}\n" if v is not None else f"{k}\n" for k, v in opts)
