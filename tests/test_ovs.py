"""A private Open vSwitch: start, bridge two namespaces, stop without leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipop_switch import proc
from ipop_switch.bridge.ovs import OvsError, OvsInstance
from ipop_switch.lab import Namespaces


def _two_hosts_on_switch(ns: Namespaces, tag: str, net: str) -> tuple[str, str, str]:
    """host a, host b and a switch namespace, each host joined to the switch by a veth."""
    sw, a, b = ns.add(f"{tag}sw"), ns.add(f"{tag}a"), ns.add(f"{tag}b")
    for i, host in enumerate((a, b), start=1):
        ns.veth(host, "eth0", sw, f"p{i}")
        proc.run(["ip", "-n", host, "addr", "add", f"{net}.{i}/24", "dev", "eth0"])
    return sw, a, b


def _ovs_pids(rundir: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(rundir)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if proc.alive(int(p))]


def test_private_ovs_forwards_between_namespaces_and_leaves_nothing(scratch_lab_name, tmp_path):
    ns = Namespaces(scratch_lab_name)
    sw, a, b = _two_hosts_on_switch(ns, "x", "100.90.1")
    rundir = tmp_path / "ovs"
    ovs = OvsInstance(rundir, netns=sw).start()
    try:
        assert ovs.datapath in ("netdev", "system")
        if ovs.datapath == "netdev":
            assert "userspace-tso-enable" in ovs.vsctl("get", "Open_vSwitch", ".", "other_config")
            # every flow into the exact-match cache: lower ping RTT (docs/benchmarks.md, latency round 2)
            emc = ovs.vsctl("get", "Open_vSwitch", ".", "other_config:emc-insert-inv-prob")
            assert emc.strip().strip('"') == "1", emc
        ovs.add_bridge("br0", fail_mode="standalone")
        p1, p2 = ovs.add_port("br0", "p1"), ovs.add_port("br0", "p2")
        assert p1 > 0 and p2 > 0 and p1 != p2
        assert sorted(ovs.ports("br0")) == ["p1", "p2"]
        r = proc.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", "100.90.1.2"], netns=a, check=False)
        assert r.returncode == 0, r.stdout
        # the frames went through OVS: its flow table learned both MACs
        fdb = ovs.appctl("fdb/show", "br0")
        assert len(fdb.strip().splitlines()) >= 3, fdb
        ovs.del_port("br0", "p2")
        assert ovs.ports("br0") == ["p1"]
        r = proc.run(["ping", "-c", "1", "-W", "1", "100.90.1.2"], netns=a, check=False)
        assert r.returncode != 0  # the port is gone, so is the path
        assert _ovs_pids(rundir)
    finally:
        ovs.stop()
    assert not rundir.exists()
    assert _ovs_pids(rundir) == []


def test_two_private_instances_side_by_side(scratch_lab_name, tmp_path):
    ns = Namespaces(scratch_lab_name)
    one = _two_hosts_on_switch(ns, "y", "100.90.2")
    two = _two_hosts_on_switch(ns, "z", "100.90.3")
    inst = [OvsInstance(tmp_path / "o1", netns=one[0]), OvsInstance(tmp_path / "o2", netns=two[0])]
    try:
        for o in inst:
            o.start()
            o.add_bridge("br0", fail_mode="standalone")  # same bridge name in both: independent
            o.add_port("br0", "p1")
            o.add_port("br0", "p2")
        for (sw, a, b), net in ((one, "100.90.2"), (two, "100.90.3")):
            assert proc.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", f"{net}.2"], netns=a, check=False).returncode == 0
        inst[0].stop()
        # the second keeps working when the first is gone
        assert proc.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", "100.90.3.2"], netns=two[1], check=False).returncode == 0
    finally:
        for o in inst:
            o.stop()
    assert _ovs_pids(tmp_path) == []


def test_bad_port_is_a_clear_error(tmp_path, scratch_lab_name):
    sw = Namespaces(scratch_lab_name).add("sw")
    with OvsInstance(tmp_path / "o", netns=sw) as ovs:
        ovs.add_bridge("br0")
        with pytest.raises(OvsError, match="nosuchdev"):
            ovs.add_port("br0", "nosuchdev")


def test_missing_ovs_is_one_line_error(tmp_path):
    """Without OVS on the PATH the bring-up script says so in one line, exit 1, no traceback."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + ":/nonexistent", "IPSW_PYTHON": sys.executable}
    script = Path(__file__).parent.parent / "ovs_scripts" / "ovs-private"
    r = subprocess.run(["/bin/bash", str(script), "start", str(tmp_path / "o")], env=env, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "ovs-private: error: ovsdb-server not found: install the Debian package openvswitch-switch (./bootstrap.sh install)"
    ]


def test_ovs_script_start_status_stop(tmp_path):
    script = Path(__file__).parent.parent / "ovs_scripts" / "ovs-private"
    env = {**os.environ, "IPSW_PYTHON": sys.executable}
    rundir = tmp_path / "o"
    try:
        r = subprocess.run([str(script), "start", str(rundir)], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert subprocess.run([str(script), "status", str(rundir)], env=env, capture_output=True, text=True).stdout.strip() == "running"
    finally:
        subprocess.run([str(script), "stop", str(rundir)], env=env, timeout=30)
    assert subprocess.run([str(script), "status", str(rundir)], env=env, capture_output=True, text=True).returncode == 3
    assert _ovs_pids(rundir) == []
