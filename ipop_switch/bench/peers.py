"""The systems we compare against, set up between two lab hosts: the underlay,
wireguard-go (userspace WireGuard) and tinc 1.0 in switch mode (a TAP overlay); the
base class and helpers the other peers (``peer_*.py``: nebula, OpenVPN, n2n) share.

Each system gives the two addresses to measure between and the pids whose CPU
time is charged to it. Every system is checked to really carry its traffic in
outer UDP (tinc falls back to its TCP meta connection silently otherwise).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import proc
from ..errors import IpopError
from ..lab import Lab

# bench overlay subnets (from 100.64.0.0/10, apart from the lab's LANs): one per system,
# so that all systems stay up side by side and runs can be interleaved
WG_NET = "100.98.1"
TINC_NET = "100.98.2"
NEBULA_NET = "100.98.3"
OPENVPN_NET = "100.98.4"
N2N_NET = "100.98.5"
UP_TIMEOUT = 20.0       # a peer's data path must answer a ping within this after its start


class BenchError(IpopError):
    pass


def stop_all(systems, console) -> None:
    """Stop every system; one that fails to stop is reported and the rest still stopped."""
    for s in systems:
        try:
            s.stop()
        except Exception as e:  # keep tearing down the rest
            console.print(f"[red]stopping {s.name}: {e}[/]")


@dataclass
class System:
    """A system under test between hosts a and b of a lab."""

    # (binary, Debian package) it needs beside iperf3: without them the bench skips it
    NEEDS = ()

    name: str
    lab: Lab
    a: str
    b: str
    dir: Path
    addr_a: str = ""
    addr_b: str = ""
    pids_a: list[int] = field(default_factory=list)
    pids_b: list[int] = field(default_factory=list)
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)
    _counted: list[int] = field(default_factory=list, repr=False)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for p in self._procs:
            proc.terminate(p.pid)
        self._procs.clear()
        for port in self._counted:
            for h in (self.a, self.b):
                self.lab.exec(h, ["nft", "delete", "table", "inet", f"ipsw_bench{port}"], check=False)
        self._counted.clear()

    def outer_udp_ok(self) -> bool | None:
        """True if the tunnel's packets travel in outer UDP (None: not a tunnel)."""
        return None

    def _spawn(self, host: str, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        """A daemon in host's namespace, in the foreground; it ends with the bench (even on kill -9)."""
        p = proc.spawn(argv, netns=self.lab.netns_of(host), log=log, env=env, die_with_parent=True)
        self._procs.append(p)
        return p

    def _count(self, port: int) -> None:
        """Count the bytes each host sends in outer UDP and TCP on ``port`` (nft counters)."""
        for h in (self.a, self.b):
            self.lab.exec(h, ["nft", "-f", "-"], input=_udp_counter_rules(port))
        self._counted.append(port)

    def _wait_ping(self, what: str, timeout: float = UP_TIMEOUT) -> None:
        """Wait until b answers a's ping across the tunnel: control connections and handshakes
        come first, the data path later. Names the log to read when it does not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.lab.exec(self.a, ["ping", "-c", "1", "-W", "1", self.addr_b], check=False).returncode == 0:
                return
            for p in self._procs:
                if p.poll() is not None:
                    raise BenchError(f"{what} exited with {p.returncode} before its tunnel came up (logs in {self.dir})")
        raise BenchError(f"{what} did not answer a ping within {timeout:.0f} s (logs in {self.dir})")


class Underlay(System):
    def start(self) -> None:
        self.addr_a = self.lab.host(self.a).lan_ip
        self.addr_b = self.lab.host(self.b).lan_ip


def _udp_counter_rules(port: int) -> str:
    return (
        f"table inet ipsw_bench{port} {{\n  chain out {{\n    type filter hook output priority filter; policy accept;\n"
        f"    udp dport {port} counter\n    tcp dport {port} counter\n"
        f"    udp sport {port} counter\n    tcp sport {port} counter\n  }}\n}}\n"
    )


def _counters(lab: Lab, host: str, port: int) -> dict[str, int]:
    """Bytes sent by host in outer UDP and TCP on the tunnel port (from the counter rules)."""
    out = lab.exec(host, ["nft", "list", "table", "inet", f"ipsw_bench{port}"], check=False).stdout
    res = {"udp": 0, "tcp": 0}
    for line in out.splitlines():
        line = line.strip()
        for kind in ("udp", "tcp"):
            if line.startswith(kind) and "bytes" in line:
                res[kind] += int(line.split("bytes")[1].split()[0])
    return res


class WireguardGo(System):
    """wireguard-go (Debian package), ChaCha20-Poly1305, UDP port 51820."""

    PORT = 51820
    NEEDS = (("wireguard-go", "wireguard-go"), ("wg", "wireguard-tools"))

    def start(self) -> None:
        proc.require("wireguard-go", "wireguard-go")
        proc.require("wg", "wireguard-tools")
        self.dir.mkdir(parents=True, exist_ok=True)
        keys = {}
        for h in (self.a, self.b):
            priv = proc.run(["wg", "genkey"]).stdout.strip()
            pub = proc.run(["wg", "pubkey"], input=priv).stdout.strip()
            (self.dir / f"{h}.key").write_text(priv + "\n")
            (self.dir / f"{h}.key").chmod(0o600)
            keys[h] = pub
        env = {"WG_PROCESS_FOREGROUND": "1", "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        self._count(self.PORT)
        for idx, (h, peer) in enumerate(((self.a, self.b), (self.b, self.a)), start=1):
            ns = self.lab.netns_of(h)
            # the UAPI socket /var/run/wireguard/<if>.sock is shared by all namespaces: unique names
            dev = f"wg{self.lab.spec.name}{idx}"
            p = self._spawn(h, ["wireguard-go", "-f", dev], self.dir / f"{h}.log", env=env)
            proc.wait_for(lambda: proc.run(["ip", "-n", ns, "link", "show", dev], check=False).returncode == 0,
                          timeout=10, what=f"wireguard-go {dev} on {h}")
            (self.pids_a if h == self.a else self.pids_b).append(p.pid)
            self.lab.exec(h, ["wg", "set", dev, "private-key", str(self.dir / f"{h}.key"), "listen-port", str(self.PORT),
                              "peer", keys[peer], "endpoint", f"{self.lab.host(peer).public_ip}:{self.PORT}",
                              "allowed-ips", f"{WG_NET}.{2 if idx == 1 else 1}/32"])
            self.lab.exec(h, ["ip", "addr", "add", f"{WG_NET}.{idx}/24", "dev", dev])
            self.lab.exec(h, ["ip", "link", "set", dev, "mtu", "1420", "up"])
        self.addr_a, self.addr_b = f"{WG_NET}.1", f"{WG_NET}.2"

    def outer_udp_ok(self) -> bool:
        c = _counters(self.lab, self.a, self.PORT)
        return c["udp"] > 0 and c["tcp"] == 0


class TincSwitch(System):
    """tinc 1.0 in switch mode (a TAP overlay, like ours), AES-256-CBC + HMAC-SHA256, port 655."""

    PORT = 655
    NEEDS = (("tincd", "tinc"),)

    def start(self) -> None:
        proc.require("tincd", "tinc")
        names = {self.a: "a", self.b: "b"}
        for idx, h in enumerate((self.a, self.b), start=1):
            conf = self.dir / h
            (conf / "hosts").mkdir(parents=True, exist_ok=True)
            other = self.b if h == self.a else self.a
            (conf / "tinc.conf").write_text(
                f"Name = {names[h]}\nMode = switch\nInterface = tinc0\nAddressFamily = ipv4\n"
                f"ConnectTo = {names[other]}\nPort = {self.PORT}\n"
            )
            up = conf / "tinc-up"
            up.write_text(f"#!/bin/sh\nip link set $INTERFACE up\nip addr add {TINC_NET}.{idx}/24 dev $INTERFACE\n")
            up.chmod(0o755)
        for h in (self.a, self.b):
            conf = self.dir / h
            proc.run(["tincd", "-c", str(conf), "-K", "2048"], input="\n\n", timeout=60)
            host_file = conf / "hosts" / names[h]
            body = host_file.read_text()
            host_file.write_text(f"Address = {self.lab.host(h).public_ip}\nPort = {self.PORT}\n"
                                 "Cipher = aes-256-cbc\nDigest = sha256\n" + body)
        for h in (self.a, self.b):  # each host knows the other's host file
            other = self.b if h == self.a else self.a
            src = self.dir / other / "hosts" / names[other]
            (self.dir / h / "hosts" / names[other]).write_text(src.read_text())
        self._count(self.PORT)
        for h in (self.a, self.b):
            p = self._spawn(h, ["tincd", "-c", str(self.dir / h), "-D", f"--pidfile={self.dir / h / 'tinc.pid'}"],
                            self.dir / f"{h}.log")
            (self.pids_a if h == self.a else self.pids_b).append(p.pid)
        self.addr_a, self.addr_b = f"{TINC_NET}.1", f"{TINC_NET}.2"
        self._wait_ping("tinc")     # tinc connects its meta connection first

    def outer_udp_ok(self) -> bool:
        c = _counters(self.lab, self.a, self.PORT)
        # the meta connection is TCP and small; the data must dominate in UDP
        return c["udp"] > 10 * max(c["tcp"], 1)
