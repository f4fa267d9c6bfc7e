"""Overlay nodes in the lab: a group CA, node identities and certificates, node
configs, and ``ipop-switch up`` running in each host's namespace.

Everything is made with the project's own code (identity store, group CA, config
schema), as a user would; files live in the lab's state directory, agents write
pid files there, so ``lab down`` stops them too.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import proc
from ..bridge.ovs import host_buffer_note
from ..config_writer import write_config
from ..identity.ca import GroupCA
from ..identity.store import NodeIdentity
from ..status_client import query
from .lab import Lab, LabError
from . import services
from .ipv6 import TURN_ADDR6, XMPP_ADDR6


@dataclass
class LabNode:
    host: str
    dir: Path
    config: Path
    node_id: str
    address: str
    address6: str
    index: int = 0
    proc: subprocess.Popen | None = None
    web: str | None = None             # the overlay view's URL inside the host's namespace ([node.web])

    @property
    def status_socket(self) -> Path:
        return self.dir / "state" / "agent.sock"

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]

    @property
    def ip6(self) -> str:
        return self.address6.split("/")[0]


WEB_PORT = 9466       # [node.web]'s default port, in each host's own namespace


def overlay_address(index: int, *, net: int = 99) -> tuple[str, str]:
    """Node ``index`` (1-based) of a lab overlay: 100.<net>.0.<index>/16 and fd00:<net>::<index>/64."""
    return f"100.{net}.0.{index}/16", f"fd00:{net}::{index:x}/64"


def _services_over_v6(ov: dict) -> None:
    """An overlay table of an IPv6-only host: XMPP, STUN and TURN at the core's IPv6
    addresses (lab/ipv6.py); the TURN server still relays on IPv4 (lab/services.py)."""
    if "server" in ov["xmpp"]:
        ov["xmpp"]["server"] = XMPP_ADDR6
    at = f"[{TURN_ADDR6}]:{services.TURN_PORT}"
    ov["ice"]["stun"] = at
    if "turn" in ov["ice"]:
        ov["ice"]["turn"] = at


class LabGroup:
    """GroupVPN overlays over some hosts of a lab: by default one overlay ``demo`` on 100.99/16;
    with ``overlays={"red": 97, "blue": 98}`` every node joins each (one bridge each)."""

    def __init__(self, lab: Lab, name: str = "demo", *, net: int = 99, mtu: int = 1400,
                 extra: dict | None = None, overlays: dict[str, int] | None = None) -> None:
        self.lab = lab
        self.overlays = overlays or {name: net}
        self.name = next(iter(self.overlays))
        self.mtu = mtu
        self.extra = extra or {}
        self.dir = lab.dir / "groups" / "-".join(self.overlays)
        # OVS's userspace datapath reads ports through packet sockets sized by the host-wide
        # net.core.rmem_default, writable only from the root namespace (where we are now)
        self.buffer_note = host_buffer_note("netdev")
        self.cas = {ov: GroupCA.create(self.dir / f"ca-{ov}", ov, force=True) for ov in self.overlays}
        self.nodes: dict[str, LabNode] = {}
        if not self.extra.get("no_room_in_advance"):   # a cluster's room made before anyone joins
            for ov in self.overlays:
                lab.create_room(f"ipsw-{ov}".lower())

    def add(self, host: str, *, index: int | None = None, attach: list[dict] | None = None,
            ovs: dict | None = None, dns: bool = False, web: bool = False) -> LabNode:
        """Identity, certificates (issued by each group CA and installed) and config for ``host``;
        ``attach``: guests of the (first) overlay, as ``[[overlay.attach]]`` tables; ``ovs``: the
        node's ``[ovs]`` table (default a private OVS; ``{"mode": "system", "db_socket": ...}``);
        ``dns``: every overlay's DNS responder on (``[overlay.dns]``: overlay address and 127.53.x.y,
        port 53); ``web``: the overlay view on 127.0.0.1:WEB_PORT in the host's namespace."""
        h = self.lab.host(host)
        index = index or len(self.nodes) + 1
        ndir = self.dir / "nodes" / host
        ident = NodeIdentity.create(ndir / "identity", name=host, force=True)
        for ca in self.cas.values():
            ident.install(ca.bundle(ca.issue(ident.request())))
        turn = self.lab.services()["turn"]
        overlays, first = [], None
        for ov, net in self.overlays.items():
            addr, addr6 = overlay_address(index, net=net)
            first = first or (addr, addr6)
            ice: dict = {"stun": f"{services.TURN_ADDR}:{services.TURN_PORT}"}
            if not self.extra.get("no_turn"):
                ice.update(turn=f"{services.TURN_ADDR}:{services.TURN_PORT}", turn_user=turn["user"],
                           turn_password=turn["password"], turn_transport=self.extra.get("turn_transport", "udp"))
            if self.extra.get("port_prediction") is False:     # keep hard<->easy on TURN (what the test shows)
                ice["port_prediction"] = False
            overlays.append({
                "name": ov, "address": addr, "address6": addr6, "mtu": self.mtu,
                "xmpp": {**self._xmpp_servers(index), "jid": f"{h.xmpp_user}@{services.XMPP_DOMAIN}",
                         "password": h.xmpp_password, "ca_file": self.lab.ca_cert},
                "ice": ice,
            })
            if h.ip == "v6":     # an IPv6-only host reaches the core's services on their IPv6 addresses
                _services_over_v6(overlays[-1])
            if self.extra.get("topology"):
                overlays[-1]["topology"] = dict(self.extra["topology"])
            if dns:
                overlays[-1]["dns"] = {"enable": True}
        if attach:
            overlays[0]["attach"] = attach
        cfg = ndir / "node.toml"
        node_table: dict = {"identity_dir": ndir / "identity", "state_dir": ndir / "state",
                            "metrics": "127.0.0.1:9465", "worker_processes": self.extra.get("worker_processes", 1)}
        if web:
            node_table["web"] = {"enable": True, "listen": f"127.0.0.1:{WEB_PORT}"}
        write_config(cfg, {
            "node": node_table,
            "ovs": ovs or {"mode": "private"},
            "overlay": overlays,
        }, header="written by the ipop-switch lab")
        node = LabNode(host, ndir, cfg, ident.node_id, *first, index=index,
                       web=f"http://127.0.0.1:{WEB_PORT}/" if web else None)
        self.nodes[host] = node
        return node

    def _xmpp_servers(self, index: int) -> dict:
        """One server, or a cluster's nodes in an order that starts node ``index`` on node
        ``index`` mod N (the lab's agents spread over the cluster, each moving on when it is lost)."""
        addrs = list(getattr(self.lab, "xmpp_addrs", ()) or (services.XMPP_ADDR,))
        if len(addrs) == 1:
            return {"server": addrs[0]}
        k = (index - 1) % len(addrs)
        return {"servers": [f"{a}:{services.XMPP_PORT}" for a in addrs[k:] + addrs[:k]]}

    def address(self, host: str, overlay: str, v6: bool = False) -> str:
        """A node's overlay address (without prefix) in one of the overlays."""
        a4, a6 = overlay_address(self.nodes[host].index, net=self.overlays[overlay])
        return (a6 if v6 else a4).split("/")[0]

    def start(self, host: str, *, env: dict[str, str] | None = None) -> LabNode:
        """Run ``ipop-switch up`` in the host's namespace (output in <node dir>/agent.log), with
        ``env`` added to the environment (e.g. IPSW_LINK_TIMERS)."""
        node = self.nodes[host]
        if node.proc and node.proc.poll() is None:
            raise LabError(f"the agent on {host} already runs")
        node.proc = proc.spawn([sys.executable, "-m", "ipop_switch.cli", "up", "-c", str(node.config),
                                "--pidfile", str(node.dir / "agent.pid")],
                               netns=self.lab.netns_of(host), log=node.dir / "agent.log", env=env,
                               die_with_parent=self.lab.tied)
        return node

    def stop(self, host: str, *, kill: bool = False) -> None:
        node = self.nodes[host]
        if node.proc:
            if kill:
                node.proc.kill()
            else:
                _signal(node.proc)
            _reap(node, 15)

    def stop_all(self) -> None:
        """SIGTERM to every node at once, then wait for each: their shutdowns (links closed,
        the private OVS stopped: ~3 s a node) overlap instead of adding up."""
        live = [n for n in self.nodes.values() if n.proc]
        for n in live:
            _signal(n.proc)
        deadline = time.monotonic() + 15
        for n in live:
            _reap(n, max(0.1, deadline - time.monotonic()))

    def status(self, host: str) -> dict:
        return query(self.nodes[host].status_socket)


def _signal(p: subprocess.Popen) -> None:
    try:
        p.terminate()
    except ProcessLookupError:
        pass


def _reap(node: LabNode, timeout: float) -> None:
    """Wait ``timeout`` seconds for the node's agent to end, then SIGKILL it."""
    try:
        node.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        node.proc.kill()
        try:
            node.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    node.proc = None
