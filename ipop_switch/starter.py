"""The starter node config ``ipop-switch init`` writes: every field a user must set, commented."""

from __future__ import annotations

from pathlib import Path

STARTER = """# ipop-switch node config (written by 'ipop-switch init'; checked at start: errors name the field)
[node]
identity_dir = "{identity_dir}"
state_dir = "/run/ipop-switch"
metrics = "127.0.0.1:9465"        # Prometheus text; "" to disable
worker_processes = 0               # 0: one per core but one

[ovs]
mode = "private"                   # a private ovsdb-server + ovs-vswitchd under state_dir

[[overlay]]                        # one table per overlay; each gets its own bridge ipsw<name>
name = "mygroup"                   # the group name used with 'ipop-switch group create'
address = "100.99.0.1/16"          # this node's address on the overlay (unique per node)
address6 = "fd00:99::1/64"
mtu = 1400
max_peers = 32

[overlay.xmpp]
server = "xmpp.example.org"
jid = "node1@example.org"
password_file = "/etc/ipop-switch/xmpp-password"
ca_file = "/etc/ipop-switch/xmpp-ca.crt"   # the CA of the XMPP server's certificate (omit: system CAs)

[overlay.ice]
stun = "turn.example.org:3478"
turn = "turn.example.org:3478"
turn_user = "ipsw"
turn_password = "change-me"
"""


def write_starter_config(path: Path, *, identity_dir: Path) -> bool:
    """Write the starter config unless one exists; True if written."""
    path = Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STARTER.format(identity_dir=identity_dir))
    path.chmod(0o600)
    return True
