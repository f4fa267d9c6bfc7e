"""The Vagrant lab cannot boot here: test what can be, the generated configs (with each
node's guests), the Vagrantfile's syntax, and its provisioning scripts as Vagrant would
render them (Ruby with a stand-in for Vagrant), run as far as they touch nothing."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ipop_switch.config import load_config
from ipop_switch.deploy import generate
from ipop_switch.identity.store import NodeIdentity

ROOT = Path(__file__).parent.parent
VAGRANTFILE = ROOT / "vagrant" / "Vagrantfile"
VENV_BIN = Path(sys.executable).parent          # has python and ipop-switch, like the VMs' venv
needs_ruby = pytest.mark.skipif(not shutil.which("ruby"), reason="ruby not installed (bootstrap installs it)")


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
        # one guest by default
        assert [(g.name, g.netns) for g in ov.attach] == [("guest1", "ipsw-guest1")]
        ident = NodeIdentity.load(out / f"node{i}" / "identity")
        ids.add(ident.node_id)
        members.append(ident.membership("demo"))
        assert (out / f"node{i}" / "identity" / "signing.key").stat().st_mode & 0o077 == 0
    assert len(addrs) == 3 and len(ids) == 3
    assert json.loads(r.stdout)["guests"]["node2"][0]["addresses"] == ["100.99.12.1/16", "fd00:99::2:1/64"]
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


def check_guests(out: Path, nodes: int, guests: int, net: str, net6: str, summary: dict) -> None:
    """Every node config loads and carries ``guests`` netns guests; MACs and addresses are
    unique across the group, inside the overlay nets and apart from the nodes' own."""
    n4, n6 = ipaddress.ip_network(net), ipaddress.ip_network(net6)
    node_addrs, macs, addrs = set(), [], []
    for i in range(1, nodes + 1):
        ov = load_config(out / f"node{i}" / "node.toml").overlay[0]
        node_addrs |= {ipaddress.ip_interface(ov.address).ip, ipaddress.ip_interface(ov.address6).ip}
        assert [g.name for g in ov.attach] == [f"guest{j}" for j in range(1, guests + 1)]
        assert [g.netns for g in ov.attach] == [f"ipsw-guest{j}" for j in range(1, guests + 1)]
        assert summary["guests"][f"node{i}"] == [
            {"name": g.name, "netns": g.netns, "mac": g.mac, "addresses": g.addresses} for g in ov.attach]
        for g in ov.attach:
            assert g.kind == "netns" and g.pid is None and g.interface is None
            first = int(g.mac.split(":")[0], 16)
            assert first & 0b11 == 0b10, f"{g.mac}: not a locally administered unicast MAC"
            macs.append(g.mac.lower())
            v4, v6 = (ipaddress.ip_interface(a) for a in g.addresses)
            assert v4.network == n4 and v6.network == n6, g.addresses
            assert v4.ip not in (n4.network_address, n4.broadcast_address) and v6.ip != n6.network_address
            addrs += [v4.ip, v6.ip]
    assert len(macs) == len(set(macs)) == nodes * guests
    assert len(addrs) == len(set(addrs)) == 2 * nodes * guests
    assert not node_addrs & set(addrs)


def gen(out: Path, nodes: int, **kw) -> dict:
    return generate(out, nodes=nodes, signal_ip="198.18.10.2",
                    node_ips=[f"198.18.10.{10 + i}" for i in range(1, nodes + 1)], **kw)


def test_guests_in_the_default_nets(tmp_path):
    summary = gen(tmp_path, 4, guests=3)
    check_guests(tmp_path, 4, 3, "100.99.0.0/16", "fd00:99::/64", summary)
    # the readable layout: node k's guest j at 100.99.(10+k).j, fd00:99::k:j
    assert summary["guests"]["node4"][2]["addresses"] == ["100.99.14.3/16", "fd00:99::4:3/64"]
    assert summary["guests"]["node4"][2]["mac"] == "02:99:00:00:04:03"


def test_guests_in_a_small_net_take_the_lowest_free_blocks(tmp_path):
    # a /20 has no room for blocks 11..20: guests go right above the nodes' addresses
    summary = gen(tmp_path, 10, guests=2, overlay_net="100.64.16.0/20", overlay_net6="fd00:5::/96")
    check_guests(tmp_path, 10, 2, "100.64.16.0/20", "fd00:5::/96", summary)
    assert summary["guests"]["node1"][0]["addresses"] == ["100.64.18.1/20", "fd00:5::1:1/96"]


def test_no_guests(tmp_path):
    summary = gen(tmp_path, 2, guests=0)
    assert summary["guests"] == {"node1": [], "node2": []}
    assert load_config(tmp_path / "node1" / "node.toml").overlay[0].attach == []
    assert "attach" not in (tmp_path / "node1" / "node.toml").read_text()


@pytest.mark.parametrize("kw, says", [
    ({"overlay_net": "100.99.0.0/24"}, "overlay net 100.99.0.0/24 is too small for 3 nodes with 1 guests each: a /21"),
    ({"overlay_net6": "fd00:99::/112"}, "overlay net fd00:99::/112 is too small for 3 nodes with guests: a /110"),
    ({"guests": 255}, "guests per node: 255 is not in 0..254"),
])
def test_too_small_net_is_a_one_line_error_before_anything_is_written(tmp_path, kw, says):
    with pytest.raises(ValueError) as e:
        gen(tmp_path / "out", 3, **kw)
    assert str(e.value).startswith(says) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_bad_node_ips_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ipop_switch.cli", "deploy", "vagrant", "--nodes", "3",
                        "--signal-ip", "198.18.10.2", "--node-ips", "198.18.10.11", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == "ipop-switch: error: --node-ips: 1 addresses for 3 nodes"


@needs_ruby
def test_vagrantfile_syntax():
    r = subprocess.run(["ruby", "-c", str(VAGRANTFILE)], capture_output=True, text=True)
    assert r.returncode == 0 and "Syntax OK" in r.stdout, r.stderr


# Loads the Vagrantfile with a stand-in for Vagrant that records each machine's inline
# shell provisioning scripts (everything else is accepted and ignored).
VAGRANT_STUB = r"""
require "json"
SCRIPTS = Hash.new { |h, k| h[k] = [] }
class Recorder
  def initialize(name) @name = name end
  def define(name, **_opts) yield Recorder.new(name) end
  def provision(_kind, inline: nil, **_opts) SCRIPTS[@name] << inline if inline end
  def method_missing(_m, *_a, **_kw) yield self if block_given?; self end
  def respond_to_missing?(*) true end
end
module Vagrant
  def self.configure(_version) yield Recorder.new("*") end
end
load ARGV.fetch(0)
puts JSON.generate(SCRIPTS)
"""


def vagrant_scripts(nodes: int, guests: int) -> dict[str, str]:
    """Each machine's last provisioning script, as Vagrant would run it."""
    env = {**os.environ, "IPSW_NODES": str(nodes), "IPSW_GUESTS": str(guests)}
    r = subprocess.run(["ruby", "-e", VAGRANT_STUB, str(VAGRANTFILE)], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    return {name: scripts[-1] for name, scripts in json.loads(r.stdout).items()}


def local(script: str, gen: Path) -> str:
    """The VMs' venv and synced generated/ directory mapped to this checkout and ``gen``."""
    return script.replace("/opt/ipop-switch/venv/bin/", f"{VENV_BIN}/").replace("/vagrant/vagrant/generated", str(gen))


@needs_ruby
def test_vagrant_nodes_make_exactly_the_namespaces_their_configs_attach(tmp_path):
    scripts = vagrant_scripts(3, 2)
    assert sorted(scripts) == ["node1", "node2", "node3", "signal"]
    # the signal VM's generation step, run here up to the deploy command
    sig = scripts["signal"]
    head = sig[:sig.index("\n", sig.index(" deploy vagrant "))]
    assert "--guests 2" in head
    r = subprocess.run(["sh", "-ec", local(head, tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for i in (1, 2, 3):
        script = scripts[f"node{i}"]
        # for ns in $(READER /etc/ipop-switch/node.toml); do [ -e ... ] || ip netns add "$ns"; done
        loop = re.search(r'^for ns in \$\((.+ /etc/ipop-switch/node\.toml)\); do\n'
                         r'\s*\[ -e "/run/netns/\$ns" \] \|\| ip netns add "\$ns"\ndone$', script, re.M)
        assert loop, f"node{i}: no guarded 'ip netns add' loop over the config's guests:\n{script}"
        assert f"install -m 0600 /vagrant/vagrant/generated/node{i}/node.toml /etc/ipop-switch/node.toml" in script
        assert script.index("/etc/ipop-switch/node.toml") < loop.start() < script.index(" up -c ")
        cfg = tmp_path / f"node{i}" / "node.toml"
        names = [g.netns for g in load_config(cfg).overlay[0].attach]
        assert names == ["ipsw-guest1", "ipsw-guest2"]
        reader = local(loop.group(1), tmp_path).replace("/etc/ipop-switch/node.toml", str(cfg))
        r = subprocess.run(["sh", "-ec", reader], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.split() == names, r.stderr
    if os.geteuid() == 0 and shutil.which("unshare"):
        # the whole loop, twice (a re-provisioned VM), in a mount namespace of its own whose
        # /run/netns is a fresh tmpfs: the host's namespaces are neither seen nor touched
        loop = local(loop.group(0), tmp_path).replace("/etc/ipop-switch/node.toml", str(cfg))
        r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-ec",
                            f"mount -t tmpfs ipsw-test /run/netns\n{loop}\n{loop}\nls /run/netns"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.split() == names, r.stderr
