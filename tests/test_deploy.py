"""The Vagrant lab cannot boot here: test what can be, the generated configs and the Vagrantfile's syntax."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ipop_switch.config import load_config
from ipop_switch.identity.store import NodeIdentity

ROOT = Path(__file__).parent.parent


def test_generated_group_configs_validate_and_certificates_verify(tmp_path):
    out = tmp_path / "gen"
    r = subprocess.run([sys.executable, "-m", "ipop_switch.cli", "deploy", "vagrant", "--nodes", "3",
                        "--signal-ip", "198.18.10.2", "--node-ips", "198.18.10.11,198.18.10.12,198.18.10.13",
                        "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    addrs, ids = set(), set()
    members = []
    for i in (1, 2, 3):
        cfg = load_config(out / f"node{i}" / "node.toml")
        ov = cfg.overlay[0]
        addrs.add(ov.address)
        assert ov.xmpp.server == "198.18.10.2" and ov.ice.turn_addr() == ("198.18.10.2", 3478)
        ident = NodeIdentity.load(out / f"node{i}" / "identity")
        ids.add(ident.node_id)
        members.append(ident.membership("demo"))
        assert (out / f"node{i}" / "identity" / "signing.key").stat().st_mode & 0o077 == 0
    assert len(addrs) == 3 and len(ids) == 3
    # every node accepts every other node's certificate
    for m in members:
        for other in members:
            assert m.verifier.verify(other.cert_der).node_id == other.node_id
    accounts = (out / "signal" / "accounts.txt").read_text().split()
    assert accounts[0::2] == ["node1", "node2", "node3"]
    assert "interfaces = { \"198.18.10.2\" }" in (out / "signal" / "prosody.cfg.lua").read_text()
    # the Prosody config is valid Lua (luac5.4 comes with Prosody's lua5.4)
    r = subprocess.run(["luac5.4", "-p", str(out / "signal" / "prosody.cfg.lua")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_bad_node_ips_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ipop_switch.cli", "deploy", "vagrant", "--nodes", "3",
                        "--signal-ip", "198.18.10.2", "--node-ips", "198.18.10.11", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == "ipop-switch: error: --node-ips: 1 addresses for 3 nodes"


@pytest.mark.skipif(not shutil.which("ruby"), reason="ruby not installed (bootstrap installs it)")
def test_vagrantfile_syntax():
    r = subprocess.run(["ruby", "-c", str(ROOT / "vagrant" / "Vagrantfile")], capture_output=True, text=True)
    assert r.returncode == 0 and "Syntax OK" in r.stdout, r.stderr
