"""nebula (Debian package ``nebula``) between the two bench hosts, set up as its docs
recommend for speed on a 1500-byte underlay:

- a per-run CA and host certificates from ``nebula-cert`` (in the bench's directory);
- no lighthouse: both hosts are in each other's ``static_host_map`` (two nodes on public
  addresses need none; a lighthouse would only add a third process);
- ``tun.mtu`` = underlay MTU - 60 (nebula's own rule: "set tun.mtu to the highest MTU
  supported minus 60", github.com/slackhq/nebula/pull/16; the default 1300 is its safe
  value for unknown internet paths);
- ``listen.read_buffer``/``write_buffer`` 10 MiB (nebula.defined.net/docs/config/listen);
- ``routines: 1``: "the maximum recommended setting is half of the available CPU cores"
  (nebula.defined.net/docs/config/routines) and this machine has two, shared by both ends;
- ``cipher: aes`` (AES-256-GCM, the default; AES-NI makes it the faster of the two);
- a firewall that lets everything in and out (its conntrack still runs, as in use).

The config is written as JSON, which is YAML.
"""

from __future__ import annotations

import json

from .. import proc
from .peers import NEBULA_NET, System, _counters

UNDERLAY_MTU = 1500


class Nebula(System):
    """nebula 1.6 (Debian 12), AES-256-GCM over UDP port 4242, a TUN overlay (layer 3)."""

    PORT = 4242
    NEEDS = (("nebula", "nebula"), ("nebula-cert", "nebula"))

    def start(self) -> None:
        for b, pkg in self.NEEDS:
            proc.require(b, pkg)
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        proc.run(["nebula-cert", "ca", "-name", "ipsw-bench", "-duration", "24h",
                  "-out-crt", str(d / "ca.crt"), "-out-key", str(d / "ca.key")])
        hosts = ((self.a, 1, self.b, 2), (self.b, 2, self.a, 1))
        for h, idx, _, _ in hosts:
            proc.run(["nebula-cert", "sign", "-ca-crt", str(d / "ca.crt"), "-ca-key", str(d / "ca.key"),
                      "-name", h, "-ip", f"{NEBULA_NET}.{idx}/24",
                      "-out-crt", str(d / f"{h}.crt"), "-out-key", str(d / f"{h}.key")])
        self._count(self.PORT)
        for h, idx, peer, peer_idx in hosts:
            conf = {
                "pki": {"ca": str(d / "ca.crt"), "cert": str(d / f"{h}.crt"), "key": str(d / f"{h}.key")},
                "static_host_map": {f"{NEBULA_NET}.{peer_idx}": [f"{self.lab.host(peer).public_ip}:{self.PORT}"]},
                "lighthouse": {"am_lighthouse": False, "interval": 60, "hosts": []},
                "listen": {"host": "0.0.0.0", "port": self.PORT,
                           "read_buffer": 10 * 1024 * 1024, "write_buffer": 10 * 1024 * 1024},
                "punchy": {"punch": False},
                "cipher": "aes",
                "routines": 1,
                "tun": {"disabled": False, "dev": "nebula1", "drop_local_broadcast": False,
                        "drop_multicast": False, "tx_queue": 500, "mtu": UNDERLAY_MTU - 60,
                        "routes": [], "unsafe_routes": []},
                "logging": {"level": "info", "format": "text"},
                "firewall": {"conntrack": {"tcp_timeout": "12m", "udp_timeout": "3m", "default_timeout": "10m"},
                             "outbound": [{"port": "any", "proto": "any", "host": "any"}],
                             "inbound": [{"port": "any", "proto": "any", "host": "any"}]},
            }
            path = d / f"{h}.yml"
            path.write_text(json.dumps(conf, indent=1))
            p = self._spawn(h, ["nebula", "-config", str(path)], d / f"{h}.log")
            (self.pids_a if h == self.a else self.pids_b).append(p.pid)
        self.addr_a, self.addr_b = f"{NEBULA_NET}.1", f"{NEBULA_NET}.2"
        self._wait_ping("nebula")     # the handshake happens on the first packet

    def outer_udp_ok(self) -> bool:
        c = _counters(self.lab, self.a, self.PORT)
        return c["udp"] > 0 and c["tcp"] == 0
