"""OpenVPN 2.6 (Debian package ``openvpn``) in TAP mode between the two bench hosts, set up
as its manual recommends for speed:

- peer-to-peer TLS with self-signed certificates checked by ``--peer-fingerprint``, the
  manual's "small OpenVPN setup" (openvpn-examples(5), 2.6) in place of a PKI; the
  deprecated static-key mode (``--secret``) would rule out the AEAD ciphers;
- ``--data-ciphers AES-256-GCM`` (2.6 negotiates it in p2p mode too; AES-NI makes it the
  fastest; the log's "Data Channel: cipher" line is checked);
- ``--proto udp4``, ``--fast-io`` ("improving CPU efficiency by 5% to 10%", UDP only);
- ``--sndbuf``/``--rcvbuf`` 4 MiB (the OS default otherwise), ``--txqueuelen 1000``;
- the default ``--tun-mtu 1500`` with the default ``--mssfix 1492 mtu``: TCP inside is
  clamped so that each outer packet fits the 1500-byte underlay unfragmented (the manual
  advises leaving tun-mtu alone and using mssfix for the path);
- ``--disable-dco``: data channel offload (the ovpn-dco kernel module) carries TUN only,
  not TAP, and is not in Debian 12's kernel; said explicitly so the run never depends on it.
"""

from __future__ import annotations

import re

from .. import proc
from .peers import OPENVPN_NET, BenchError, System, _counters

CIPHER = "AES-256-GCM"
SOCKET_BUF = 4 * 1024 * 1024


class OpenVpnTap(System):
    """OpenVPN 2.6 (Debian 12), TAP (layer 2) over UDP port 1194, AES-256-GCM, no DCO."""

    PORT = 1194
    NEEDS = (("openvpn", "openvpn"), ("openssl", "openssl"))

    def start(self) -> None:
        for b, pkg in self.NEEDS:
            proc.require(b, pkg)
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        fingerprint = {}
        for h in (self.a, self.b):       # as in openvpn-examples(5): EC P-384, self-signed
            proc.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp384r1",
                      "-keyout", str(d / f"{h}.key"), "-out", str(d / f"{h}.crt"), "-nodes", "-sha256",
                      "-days", "2", "-subj", f"/CN={h}"])
            out = proc.run(["openssl", "x509", "-fingerprint", "-sha256", "-noout", "-in", str(d / f"{h}.crt")]).stdout
            fingerprint[h] = out.strip().split("=", 1)[1]
        self._count(self.PORT)
        roles = ((self.a, self.b, ["--tls-server", "--dh", "none"]), (self.b, self.a, ["--tls-client"]))
        for idx, (h, peer, role) in enumerate(roles, 1):
            argv = ["openvpn", "--dev", "ovpntap", "--dev-type", "tap", "--proto", "udp4",
                    "--local", self.lab.host(h).public_ip, "--lport", str(self.PORT),
                    "--remote", self.lab.host(peer).public_ip, "--rport", str(self.PORT),
                    "--ifconfig", f"{OPENVPN_NET}.{idx}", "255.255.255.0",
                    *role, "--cert", str(d / f"{h}.crt"), "--key", str(d / f"{h}.key"),
                    "--peer-fingerprint", fingerprint[peer],
                    "--data-ciphers", CIPHER, "--disable-dco", "--fast-io",
                    "--sndbuf", str(SOCKET_BUF), "--rcvbuf", str(SOCKET_BUF), "--txqueuelen", "1000",
                    "--tun-mtu", "1500", "--mssfix", "1492", "mtu",
                    "--verb", "3"]
            p = self._spawn(h, argv, d / f"{h}.log")
            (self.pids_a if h == self.a else self.pids_b).append(p.pid)
        self.addr_a, self.addr_b = f"{OPENVPN_NET}.1", f"{OPENVPN_NET}.2"
        self._wait_ping("openvpn")   # the TLS handshake comes first
        cipher = self.data_cipher()
        if cipher != CIPHER:
            raise BenchError(f"openvpn negotiated the data cipher {cipher!r}, not {CIPHER} (logs in {d})")

    def data_cipher(self) -> str | None:
        """The data channel's cipher, as a's log reports it."""
        m = re.findall(r"Data Channel: cipher '([^']+)'", (self.dir / f"{self.a}.log").read_text(errors="replace"))
        return m[-1] if m else None

    def outer_udp_ok(self) -> bool:
        c = _counters(self.lab, self.a, self.PORT)
        return c["udp"] > 0 and c["tcp"] == 0

    def extra_results(self, lab) -> dict:
        return {"cipher": self.data_cipher()}
