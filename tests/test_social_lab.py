"""SocialVPN end to end in the lab (docs/social.md): real agents (ipop-switch up), the lab's
Prosody with ordinary accounts, friendships made through the CLI (real subscriptions).

alice has two devices (laptop on a public host, phone behind an easy NAT), bob is on a public
host, carol behind a hard NAT (alice's phone reaches her over the TURN relay). alice is friends
with bob and with carol; bob and carol are not friends. Every node uses the SAME own address
100.80.0.1: each reaches its friends at addresses it assigned itself.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from conftest import unique_name
from helpers.wait import wait_until
from ipop_switch import proc
from ipop_switch.config_writer import write_config
from ipop_switch.identity import NodeIdentity
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.lab import services
from ipop_switch.status_client import query

pytestmark = [pytest.mark.lab, pytest.mark.slow]

OVERLAY = "soc"
OWN = "100.80.0.1"
DOMAIN = services.XMPP_DOMAIN
# node -> (host, user, device name)
NODES = {"laptop": ("pubh1", "alice", "laptop"), "phone": ("easyh1", "alice", "phone"),
         "bob": ("pubh2", "bob", "desk"), "carol": ("hardh1", "carol", "pc")}
LINK_TIMEOUT = 60.0


class SocialNode:
    def __init__(self, lab: Lab, root: Path, key: str, password: str) -> None:
        self.lab, self.key = lab, key
        self.host, self.user, self.device = NODES[key]
        self.jid = f"{self.user}@{DOMAIN}"
        self.dir = root / key
        self.proc = None
        turn = lab.services()["turn"]
        NodeIdentity.create(self.dir / "identity", name=self.device, force=True)
        write_config(self.config, {
            "node": {"identity_dir": self.dir / "identity", "state_dir": self.dir / "state", "metrics": "",
                     "worker_processes": 1},
            "ovs": {"mode": "private"},
            "overlay": [{
                "name": OVERLAY, "kind": "social", "address": f"{OWN}/16", "mtu": 1400,
                "xmpp": {"server": services.XMPP_ADDR, "jid": self.jid, "password": password,
                         "ca_file": lab.ca_cert},
                "ice": {"stun": f"{services.TURN_ADDR}:{services.TURN_PORT}",
                        "turn": f"{services.TURN_ADDR}:{services.TURN_PORT}", "turn_user": turn["user"],
                        "turn_password": turn["password"]},
                "social": {"node": self.device},
            }],
        }, header="written by test_social_lab")

    @property
    def config(self) -> Path:
        return self.dir / "node.toml"

    @property
    def sock(self) -> Path:
        return self.dir / "state" / "agent.sock"

    def start(self) -> None:
        self.proc = proc.spawn([sys.executable, "-m", "ipop_switch.cli", "up", "-c", str(self.config),
                                "--pidfile", str(self.dir / "agent.pid")],
                               netns=self.lab.netns_of(self.host), log=self.dir / "agent.log")
        wait_until(lambda: self.sock.exists() and self.online(), 30, f"{self.key}'s agent online",
                   retry_on=(Exception,))

    def stop(self) -> None:
        if self.proc is not None:
            proc.terminate(self.proc.pid, grace=15)
            self.proc = None

    def status(self) -> dict:
        return query(self.sock)

    def overlay(self) -> dict:
        return self.status()["overlays"][0]

    def online(self) -> bool:
        return self.overlay()["signaling"]["state"] == "online"

    def friends(self, *args: str, check: bool = True) -> str:
        r = self.lab.exec(self.host, [sys.executable, "-m", "ipop_switch.cli", "friends", "--socket", str(self.sock),
                                      *args], check=False, timeout=60)
        if check:
            assert r.returncode == 0, f"{self.key}: friends {' '.join(args)}: {r.stdout}{r.stderr}"
        return r.stdout

    def social(self) -> dict:
        return json.loads(self.friends("list", "--json"))

    def node_of(self, other: "SocialNode") -> dict | None:
        return self.social()["friends"].get(other.jid, {}).get("nodes", {}).get(other.device)

    def addr_of(self, other: "SocialNode") -> str:
        return self.node_of(other)["address"]

    def state_of(self, other: "SocialNode") -> str | None:
        n = self.node_of(other)
        return n["state"] if n else None

    def ping(self, addr: str, count: int = 2, wait: float = 2) -> bool:
        return self.lab.exec(self.host, ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", str(wait), addr],
                             check=False, timeout=30).returncode == 0


def befriend(a: SocialNode, b: SocialNode) -> None:
    a.friends("add", b.jid)
    wait_until(lambda: b.social()["friends"].get(a.jid, {}).get("requested"), 20, f"{b.key} to see {a.key}'s request")
    b.friends("accept", a.jid)
    wait_until(lambda: a.social()["friends"].get(b.jid, {}).get("subscription") == "both", 20,
               f"{a.key} and {b.key} to be friends")


def linked(a: SocialNode, b: SocialNode, timeout: float = LINK_TIMEOUT) -> None:
    wait_until(lambda: a.state_of(b) == "linked" and b.state_of(a) == "linked", timeout,
               f"{a.key} <-> {b.key} linked", interval=0.5, retry_on=(Exception,))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("social")
    lab = Lab(LabSpec(name=unique_name("s"), sites=(SiteSpec("pub", "none", hosts=2), SiteSpec("easy", "easy"),
                                                    SiteSpec("hard", "hard"))))
    nodes: dict[str, SocialNode] = {}
    try:
        lab.up()
        passwords = {u: lab.add_account(u) for u in ("alice", "bob", "carol")}
        for key in NODES:
            nodes[key] = SocialNode(lab, root, key, passwords[NODES[key][1]])
        for n in nodes.values():
            n.start()
        befriend(nodes["laptop"], nodes["bob"])
        befriend(nodes["laptop"], nodes["carol"])
        yield lab, nodes
    finally:
        for n in nodes.values():
            n.stop()
        for n in nodes.values():
            log = n.dir / "agent.log"
            if log.exists():
                print(f"---- {n.key} agent.log (tail)\n" + "\n".join(log.read_text().splitlines()[-40:]),
                      file=sys.stderr)
        lab.down()


def test_friends_reach_each_other_at_their_own_views(world):
    lab, n = world
    laptop, phone, bob, carol = n["laptop"], n["phone"], n["bob"], n["carol"]
    for a, b in ((laptop, bob), (laptop, carol), (phone, bob), (phone, carol), (laptop, phone)):
        linked(a, b)
    for a, b in ((laptop, bob), (laptop, carol), (phone, bob), (phone, carol), (bob, laptop), (carol, phone)):
        addr = a.addr_of(b)
        assert addr != OWN and addr.startswith("100.80.")
        assert wait_until(lambda: a.ping(addr, count=1), 10, f"{a.key} -> {b.key} at {addr}")
    # the relay carries the hard-NAT friend's link to the easy-NAT phone
    assert phone.social()["friends"][carol.jid]["nodes"][carol.device]["path"] == "relay"
    # bob and carol are not friends: nothing of one is known to the other
    assert carol.jid not in bob.social()["friends"] and bob.jid not in carol.social()["friends"]
