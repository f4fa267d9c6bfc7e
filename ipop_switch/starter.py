"""The starter node config ``ipop-switch init`` writes: every field a user must set, commented."""

from __future__ import annotations

from pathlib import Path

from .config_writer import write_config

HEADER = "ipop-switch node config (written by 'ipop-switch init'; checked at start: errors name the field)"

NOTES = {
    "node.metrics": 'Prometheus text; "" to disable',
    "node.worker_processes": "0: one per core but one (at least one)",
    "ovs.mode": "a private ovsdb-server + ovs-vswitchd under state_dir",
    "overlay": "one table per overlay; each gets its own bridge ipsw<name>",
    "overlay.name": "the group name used with 'ipop-switch group create'",
    "overlay.address": "this node's address on the overlay (unique per node)",
    "overlay.xmpp.ca_file": "the CA of the XMPP server's certificate (omit: system CAs)",
}


def starter_config(identity_dir: Path) -> dict:
    return {
        "node": {"identity_dir": identity_dir, "state_dir": "/run/ipop-switch", "metrics": "127.0.0.1:9465",
                 "worker_processes": 0},
        "ovs": {"mode": "private"},
        "overlay": [{
            "name": "mygroup", "address": "100.99.0.1/16", "address6": "fd00:99::1/64", "mtu": 1400,
            "max_peers": 32,
            "xmpp": {"server": "xmpp.example.org", "jid": "node1@example.org",
                     "password_file": "/etc/ipop-switch/xmpp-password", "ca_file": "/etc/ipop-switch/xmpp-ca.crt"},
            "ice": {"stun": "turn.example.org:3478", "turn": "turn.example.org:3478", "turn_user": "ipsw",
                    "turn_password": "change-me"},
        }],
    }


def write_starter_config(path: Path, *, identity_dir: Path) -> bool:
    """Write the starter config unless one exists; True if written."""
    return write_config(path, starter_config(identity_dir), header=HEADER, comments=NOTES, overwrite=False)
