"""SocialVPN nodes in the lab (docs/social.md): one user's node on one lab host, with its own
identity, its own XMPP account on the lab's Prosody and a ``kind = "social"`` overlay, run
as users run it (``ipop-switch up``). Friendships are made through the agent's status socket
as ``ipop-switch friends`` does. Used by the benchmark's SocialVPN row (bench/social.py)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import proc
from ..config_writer import write_config
from ..identity.store import NodeIdentity
from ..status_client import command, query
from . import services
from .lab import Lab


@dataclass
class SocialLabNode:
    """``user``'s node ``device`` on ``host``; ``address`` is its own social address (CIDR)."""
    lab: Lab
    host: str
    dir: Path
    user: str
    device: str
    address: str
    overlay: str = "soc"
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def jid(self) -> str:
        return f"{self.user}@{services.XMPP_DOMAIN}"

    @property
    def socket(self) -> Path:
        return self.dir / "state" / "agent.sock"

    def write(self, *, dns: bool = False) -> Path:
        """A new identity, an XMPP account and the node config; the config's path."""
        NodeIdentity.create(self.dir / "identity", name=self.device, force=True)
        turn = self.lab.services()["turn"]
        xmpp = {"server": services.XMPP_ADDR, "jid": self.jid, "password": self.lab.add_account(self.user),
                "ca_file": self.lab.ca_cert}
        ice = {"stun": f"{services.TURN_ADDR}:{services.TURN_PORT}", "turn": f"{services.TURN_ADDR}:{services.TURN_PORT}",
               "turn_user": turn["user"], "turn_password": turn["password"]}
        ov = {"name": self.overlay, "kind": "social", "address": self.address, "mtu": 1400, "xmpp": xmpp, "ice": ice,
              "social": {"node": self.device}}
        if dns:
            ov["dns"] = {"enable": True}
        cfg = self.dir / "node.toml"
        write_config(cfg, {"node": {"identity_dir": self.dir / "identity", "state_dir": self.dir / "state",
                                    "metrics": "", "worker_processes": 1},
                           "ovs": {"mode": "private"}, "overlay": [ov]}, header="written by the ipop-switch lab (SocialVPN)")
        return cfg

    def start(self) -> None:
        self.proc = proc.spawn([sys.executable, "-m", "ipop_switch.cli", "up", "-c", str(self.dir / "node.toml"),
                                "--pidfile", str(self.dir / "agent.pid")],
                               netns=self.lab.netns_of(self.host), log=self.dir / "agent.log", die_with_parent=True)

    def stop(self) -> None:
        if self.proc is not None:
            proc.terminate(self.proc.pid, grace=15)    # the agent takes its OVS and workers down with it
            self.proc = None

    # -- as 'ipop-switch status' and 'ipop-switch friends' see it ----------------------------
    def status(self) -> dict:
        return next(o for o in query(self.socket)["overlays"] if o["name"] == self.overlay)

    def friends(self, op: str, **args) -> dict:
        return command(self.socket, {"cmd": "friends", "overlay": self.overlay, "op": op, **args})

    def node_of(self, other: "SocialLabNode") -> dict:
        """``other``'s node as this node lists it ({} while unknown)."""
        return self.friends("list")["friends"].get(other.jid, {}).get("nodes", {}).get(other.device) or {}


def befriend(a: SocialLabNode, b: SocialLabNode, *, timeout: float = 30.0) -> None:
    """a asks, b accepts (both agents online); returns once both see a mutual subscription."""
    def ok(cond) -> bool:
        try:
            return bool(cond())
        except (LookupError, proc.IpopError):
            return False
    a.friends("add", jid=b.jid)
    proc.wait_for(lambda: ok(lambda: b.friends("list")["friends"].get(a.jid, {}).get("requested")), timeout=timeout,
                  interval=0.25, what=f"{b.jid} to see {a.jid}'s friend request")
    b.friends("accept", jid=a.jid)
    proc.wait_for(lambda: ok(lambda: a.friends("list")["friends"].get(b.jid, {}).get("subscription") == "both"),
                  timeout=timeout, interval=0.25, what=f"{a.jid} and {b.jid} to be friends")
