"""The lab's core services: a lab CA, Prosody (XMPP over TLS) and coturn (STUN/TURN).

Both daemons run in the foreground inside the core namespace, with config,
data, pid and log files in the lab's state directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .. import proc
from ..errors import IpopError

XMPP_DOMAIN = "ipsw.test"          # .test is reserved (RFC 2606): never resolves outside
MUC_DOMAIN = f"conference.{XMPP_DOMAIN}"
XMPP_ADDR = "198.18.0.1"
TURN_ADDR = "198.18.0.2"
STUN_ADDR2 = "198.18.0.3"          # a second address, so NAT mapping behaviour can be probed
TURN_PORT = 3478
XMPP_PORT = 5222


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def make_lab_ca(dirpath: Path, *, addr: str = XMPP_ADDR, days: int = 30) -> None:
    """A CA for the lab and a server certificate for Prosody (domain and ``addr``) signed by it."""
    dirpath.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ipop-switch lab CA")])
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


def prosody_config(root: Path, ca_dir: Path, addr: str, *, pidfile: Path, run_as_root: bool) -> str:
    """Prosody's config: c2s on ``addr`` only, TLS required, no registration, a MUC component."""
    return f'''-- written by ipop-switch
run_as_root = {'true' if run_as_root else 'false'}
daemonize = false
pidfile = "{pidfile}"
data_path = "{root / 'data'}"
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = "{root / 'prosody.log'}" }} }}
interfaces = {{ "{addr}" }}
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


@dataclass
class Prosody:
    """Prosody configured by us, listening on the core's XMPP address only."""

    root: Path
    netns: str
    ca_dir: Path

    @property
    def config(self) -> Path:
        return self.root / "prosody.cfg.lua"

    @property
    def pidfile(self) -> Path:
        return self.root / "prosody.pid"

    def write_config(self) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.config.write_text(prosody_config(self.root, self.ca_dir, XMPP_ADDR, pidfile=self.pidfile, run_as_root=True))

    def register(self, user: str, password: str) -> None:
        proc.run(["prosodyctl", "--config", str(self.config), "register", user, XMPP_DOMAIN, password], timeout=30)

    def start(self) -> int:
        proc.require("prosody", "prosody")
        p = proc.spawn(["prosody", "--config", str(self.config)], netns=self.netns, log=self.root / "prosody.out")
        proc.wait_for(lambda: _listening(self.netns, XMPP_ADDR, XMPP_PORT, "tcp") or p.poll() is not None,
                      timeout=15, what="Prosody to listen")
        if p.poll() is not None:
            raise IpopError(f"Prosody exited at start; see {self.root / 'prosody.log'}")
        return p.pid


@dataclass
class Coturn:
    """coturn with long-term credentials: STUN on two addresses, TURN over UDP and TCP."""

    root: Path
    netns: str
    user: str
    password: str

    @property
    def pidfile(self) -> Path:
        return self.root / "turnserver.pid"

    def start(self) -> int:
        proc.require("turnserver", "coturn")
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [
            "turnserver", "-n",
            "--listening-ip", TURN_ADDR, "--listening-ip", STUN_ADDR2,
            "--relay-ip", TURN_ADDR, "--listening-port", str(TURN_PORT),
            "--lt-cred-mech", "--user", f"{self.user}:{self.password}", "--realm", XMPP_DOMAIN,
            "--fingerprint", "--no-tls", "--no-dtls", "--no-cli", "--no-multicast-peers",
            "--min-port", "49152", "--max-port", "65535",
            "--pidfile", str(self.pidfile), "--log-file", "stdout", "--simple-log",
        ]
        p = proc.spawn(argv, netns=self.netns, log=self.root / "turnserver.log")
        proc.wait_for(lambda: _listening(self.netns, TURN_ADDR, TURN_PORT, "udp") or p.poll() is not None,
                      timeout=15, what="coturn to listen")
        if p.poll() is not None:
            raise IpopError(f"coturn exited at start; see {self.root / 'turnserver.log'}")
        return p.pid


def _listening(netns: str, addr: str, port: int, kind: str) -> bool:
    flag = "-ltn" if kind == "tcp" else "-lun"
    out = proc.run(["ss", "-H", flag, "src", f"{addr}:{port}"], netns=netns, check=False).stdout
    return bool(out.strip())


def new_password() -> str:
    return secrets.token_urlsafe(12)
