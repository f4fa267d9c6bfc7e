"""Configs for a GroupVPN across real machines (used by vagrant/): the signaling host's
Prosody and coturn configs with a CA, and for each node its identity, group
certificate and ``node.toml`` - all made with the same code as ``ipop-switch init``,
``group create/issue/join`` and the lab, so what the VMs run is what the tests test.

Keys are generated here for convenience in a throw-away lab; on machines you care
about, run ``ipop-switch init`` on each node and ``group issue`` on the admin's host
instead (docs/deployment.md).
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


def generate(out: Path, *, nodes: int, signal_ip: str, node_ips: list[str], group: str = "demo",
             overlay_net: str = "100.99.0.0/16", overlay_net6: str = "fd00:99::/64") -> dict:
    """Write everything into ``out``; return a summary (what goes where)."""
    if nodes < 1 or len(node_ips) != nodes:
        raise ValueError("need one underlay address per node")
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
    net = ipaddress.ip_network(overlay_net)
    net6 = ipaddress.ip_network(overlay_net6)
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
            }],
        }, header="written by ipop-switch deploy")
    return {"signal": str(sig), "nodes": [str(out / f"node{i}") for i in range(1, nodes + 1)],
            "domain": XMPP_DOMAIN, "muc": MUC_DOMAIN}
