"""Configs for a GroupVPN across real machines (used by vagrant/): the signaling host's
Prosody and coturn configs with a CA, and for each node its identity, group
certificate and ``node.toml`` - all made with the same code as ``ipop-switch init``,
``group create/issue/join`` and the lab, so what the VMs run is what the tests test.

Keys are generated here for convenience in a throw-away lab; on machines you care
about, run ``ipop-switch init`` on each node and ``group issue`` on the admin's host
instead (docs/deployment.md).

Each node also gets ``guests`` network namespaces on its overlay bridge
(``[[overlay.attach]]``, netns by name): the VM's provisioning makes the namespaces
(``ip netns add``), the agent plugs them in when the overlay starts (docs/guests.md).
"""

from __future__ import annotations

import ipaddress
import secrets
from pathlib import Path

from .config_writer import write_config
from .identity.ca import GroupCA
from .identity.store import NodeIdentity
from .servers import (MUC_DOMAIN, TURN_PORT, TURN_USER, XMPP_DOMAIN, XMPP_PORT, coturn_conf, coturn_options,
                      make_server_ca, prosody_config)

SIGNAL_ETC = Path("/etc/ipop-switch-signal")

# Guest addresses: one block of 256 per node, so that in a /16 node k's guest j reads
# <net>.(10+k).j; the blocks below are the nodes' own addresses (<net>.0.k).
GUEST_BLOCK = 256
FIRST_GUEST_BLOCK = 10
MAX_GUESTS = 254                      # j in 1..254: never the block's .0 or .255
GUEST_V6_SHIFT = 16                   # IPv6: node k's guest j at <net6>::k:j


def guest_netns(j: int) -> str:
    """The namespace of a node's guest ``j`` (1-based); the same name on every node."""
    return f"ipsw-guest{j}"


def _prefix_for(count: int, bits: int) -> int:
    """The longest prefix of a net with at least ``count`` addresses."""
    return bits - max(count - 1, 1).bit_length()


def guest_tables(nodes: int, guests: int, net: ipaddress.IPv4Network,
                 net6: ipaddress.IPv6Network) -> list[list[dict]]:
    """Per node (index 0 = node1), the ``[[overlay.attach]]`` tables of its ``guests``
    namespaces: fixed MACs (locally administered, 02:99:00:<node>:<guest>) and addresses
    that collide neither with each other nor with the nodes' (network + k). Raises
    ValueError, one line, when a net cannot hold them."""
    if not 0 <= guests <= MAX_GUESTS:
        raise ValueError(f"guests per node: {guests} is not in 0..{MAX_GUESTS}")
    if not guests:
        return [[] for _ in range(nodes)]
    if nodes > 0xffff:
        raise ValueError(f"{nodes} nodes: guests are numbered for at most 65535 nodes")
    size = net.num_addresses
    first = FIRST_GUEST_BLOCK             # the readable layout where it fits, else the lowest
    if (first + nodes + 1) * GUEST_BLOCK > size:  # block above the nodes' own addresses
        first = nodes // GUEST_BLOCK + 1
    need = (first + nodes + 1) * GUEST_BLOCK
    if need > size:
        raise ValueError(f"overlay net {net} is too small for {nodes} nodes with {guests} guests each: "
                         f"a /{_prefix_for(need, 32)} or larger is needed "
                         f"(node k's guests take block k+{first} of 256 addresses)")
    need6 = (nodes + 1) << GUEST_V6_SHIFT
    if need6 > net6.num_addresses:
        raise ValueError(f"overlay net {net6} is too small for {nodes} nodes with guests: "
                         f"a /{_prefix_for(need6, 128)} or larger is needed (node k's guest j at ::k:j)")
    out = []
    for k in range(1, nodes + 1):
        out.append([{
            "name": f"guest{j}",
            "netns": guest_netns(j),
            "mac": f"02:99:00:{k >> 8:02x}:{k & 0xff:02x}:{j:02x}",
            "addresses": [f"{net.network_address + (first + k) * GUEST_BLOCK + j}/{net.prefixlen}",
                          f"{net6.network_address + (k << GUEST_V6_SHIFT) + j}/{net6.prefixlen}"],
        } for j in range(1, guests + 1)])
    return out


def generate(out: Path, *, nodes: int, signal_ip: str, node_ips: list[str], group: str = "demo",
             overlay_net: str = "100.99.0.0/16", overlay_net6: str = "fd00:99::/64", guests: int = 1) -> dict:
    """Write everything into ``out``; return a summary (what goes where, each node's guests).
    Raises ValueError (one line) on bad input, before anything is written."""
    if nodes < 1 or len(node_ips) != nodes:
        raise ValueError("need one underlay address per node")
    net = ipaddress.IPv4Network(overlay_net)
    net6 = ipaddress.IPv6Network(overlay_net6)
    if nodes + 2 > net.num_addresses or nodes + 1 > net6.num_addresses:
        raise ValueError(f"overlay nets {net} / {net6} are too small for {nodes} nodes")
    attach = guest_tables(nodes, guests, net, net6)
    out = Path(out)
    sig = out / "signal"
    make_server_ca(sig / "ca", addr=signal_ip, days=365)
    (sig / "prosody.cfg.lua").write_text(
        prosody_config(SIGNAL_ETC, SIGNAL_ETC / "ca", signal_ip, pidfile=SIGNAL_ETC / "prosody.pid", run_as_root=True))
    turn_password = secrets.token_urlsafe(12)
    (sig / "turnserver.conf").write_text(coturn_conf(
        coturn_options(listen=[signal_ip], relay=signal_ip, user=TURN_USER, password=turn_password)))
    accounts = {f"node{i}": secrets.token_urlsafe(12) for i in range(1, nodes + 1)}
    (sig / "accounts.txt").write_text("".join(f"{u} {p}\n" for u, p in accounts.items()))
    (sig / "accounts.txt").chmod(0o600)
    ca = GroupCA.create(out / "group-ca", group, force=True)
    for i in range(1, nodes + 1):
        ndir = out / f"node{i}"
        ident = NodeIdentity.create(ndir / "identity", name=f"node{i}", force=True)
        ident.install(ca.bundle(ca.issue(ident.request())))
        write_config(ndir / "node.toml", {
            "node": {"identity_dir": "/var/lib/ipop-switch", "state_dir": "/run/ipop-switch"},
            "overlay": [{
                "name": group,
                "address": f"{net.network_address + i}/{net.prefixlen}",
                "address6": f"{net6.network_address + i}/{net6.prefixlen}",
                "xmpp": {"server": signal_ip, "port": XMPP_PORT, "jid": f"node{i}@{XMPP_DOMAIN}",
                         "password": accounts[f"node{i}"], "ca_file": "/etc/ipop-switch/xmpp-ca.crt"},
                "ice": {"stun": f"{signal_ip}:{TURN_PORT}", "turn": f"{signal_ip}:{TURN_PORT}",
                        "turn_user": TURN_USER, "turn_password": turn_password},
                "attach": attach[i - 1] or None,      # none: no attach line at all
            }],
        }, header="written by ipop-switch deploy")
    return {"signal": str(sig), "nodes": [str(out / f"node{i}") for i in range(1, nodes + 1)],
            "domain": XMPP_DOMAIN, "muc": MUC_DOMAIN,
            "guests": {f"node{i}": [{k: g[k] for k in ("name", "netns", "mac", "addresses")} for g in attach[i - 1]]
                       for i in range(1, nodes + 1)}}
