"""The lab's core services: Prosody (XMPP over TLS) and coturn (STUN/TURN).

Both daemons run in the foreground inside the core namespace, with config,
data, pid and log files in the lab's state directory; their configs and the CA
come from ``ipop_switch.servers``, as a real signaling host's do.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from .. import proc
from ..errors import IpopError
from ..servers import (MUC_DOMAIN, TURN_PORT, XMPP_DOMAIN, XMPP_PORT, coturn_argv, coturn_options,  # noqa: F401
                       make_server_ca, prosody_config)
from .ipv6 import STUN_ADDR6_2, TURN_ADDR6, XMPP_ADDR6   # the same services' IPv6 addresses

XMPP_ADDR = "198.18.0.1"
TURN_ADDR = "198.18.0.2"
STUN_ADDR2 = "198.18.0.3"          # a second address, so NAT mapping behaviour can be probed


def make_lab_ca(dirpath: Path) -> None:
    """The lab's signaling CA and Prosody's certificate for the core's XMPP address."""
    make_server_ca(dirpath, addr=XMPP_ADDR)


@dataclass
class Prosody:
    """Prosody configured by us, listening on the core's XMPP address only (and its IPv6
    address when ``v6``)."""

    root: Path
    netns: str
    ca_dir: Path
    v6: bool = False

    @property
    def config(self) -> Path:
        return self.root / "prosody.cfg.lua"

    @property
    def pidfile(self) -> Path:
        return self.root / "prosody.pid"

    def write_config(self) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.config.write_text(prosody_config(self.root, self.ca_dir, [XMPP_ADDR, XMPP_ADDR6] if self.v6 else XMPP_ADDR,
                                                pidfile=self.pidfile, run_as_root=True))

    def register(self, user: str, password: str) -> None:
        proc.run(["prosodyctl", "--config", str(self.config), "register", user, XMPP_DOMAIN, password], timeout=30)

    def start(self, *, tied: bool = False) -> int:
        proc.require("prosody", "prosody")
        p = proc.spawn(["prosody", "--config", str(self.config)], netns=self.netns, log=self.root / "prosody.out",
                       die_with_parent=tied)
        proc.wait_for(lambda: _listening(self.netns, XMPP_ADDR, XMPP_PORT, "tcp") or p.poll() is not None,
                      timeout=15, what="Prosody to listen")
        if p.poll() is not None:
            raise IpopError(f"Prosody exited at start; see {self.root / 'prosody.log'}")
        return p.pid


@dataclass
class Coturn:
    """coturn with long-term credentials: STUN on two addresses, TURN over UDP and TCP; with
    ``v6`` on the two IPv6 addresses as well. Relayed addresses stay IPv4 (coturn's default
    family for an allocation that asks for none, which is what aioice sends): a client on
    IPv6 gets an IPv4 relay, so an IPv6-only host can reach IPv4-only peers through it."""

    root: Path
    netns: str
    user: str
    password: str
    v6: bool = False

    @property
    def pidfile(self) -> Path:
        return self.root / "turnserver.pid"

    def start(self, *, tied: bool = False) -> int:
        proc.require("turnserver", "coturn")
        self.root.mkdir(parents=True, exist_ok=True)
        listen = [TURN_ADDR, STUN_ADDR2] + ([TURN_ADDR6, STUN_ADDR6_2] if self.v6 else [])
        opts = coturn_options(listen=listen, relay=TURN_ADDR, user=self.user, password=self.password)
        opts += [("min-port", "49152"), ("max-port", "65535"), ("pidfile", str(self.pidfile)), ("log-file", "stdout")]
        argv = ["turnserver", "-n", *coturn_argv(opts)]
        p = proc.spawn(argv, netns=self.netns, log=self.root / "turnserver.log", die_with_parent=tied)
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
