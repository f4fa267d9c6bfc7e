"""ovs.mode = "system": the agent uses an Open vSwitch that already runs (here a private one
started by the test in the host's namespace, standing in for the system's, reached through
``ovs.db_socket``). Its bridge lives there, so a "VM" plugged in with plain ``ovs-vsctl`` as
libvirt does (``<virtualport type='openvswitch'/>``) is a guest of the overlay: it reaches the
other node and the other node's guest. A crashed agent's bridge is taken over (the VM's port
kept, stale TAPs dropped); stop removes the agent's bridge only, the OVS and its other bridges
stay; a missing or silent database socket is one error line."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

from conftest import unique_name
from helpers.agent_lab import logs_on_failure, status_json, until
from ipop_switch.bridge.ovs import OvsInstance
from ipop_switch.config_writer import write_config
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.lab.nodes import LabGroup
from ipop_switch.lab.probes import wait_links

pytestmark = [pytest.mark.lab, pytest.mark.slow]

BR = "ipswdemo"
VM_MAC, VM_IP, VM_IP6 = "02:99:00:00:20:01", "100.99.20.1", "fd00:99::20:1"
G2_MAC, G2_IP, G2_IP6 = "02:99:00:00:12:01", "100.99.12.1", "fd00:99::12:1"
VM_UUID = "6f1c7a0e-2b7d-4c55-9a51-3d2f1a7c9e01"
LINKS_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def world():
    lab = Lab(LabSpec(name=unique_name("so"), sites=(SiteSpec("pub", "none", hosts=2),)))
    sysovs = group = None
    try:
        lab.up()
        # "the system's" Open vSwitch on pubh1, with a bridge of its own that must survive us
        sysovs = OvsInstance(Path(tempfile.mkdtemp(prefix="ipsw-sysovs-")), netns=lab.netns_of("pubh1"),
                             datapath="netdev").start()
        lab.exec("pubh1", ["ip", "link", "add", "keep0", "type", "veth", "peer", "name", "keep1"])
        lab.exec("pubh1", ["ip", "link", "set", "keep0", "up"])
        sysovs.add_bridge("vmbr0", fail_mode="standalone")
        sysovs.add_port("vmbr0", "keep0")
        group = LabGroup(lab, "demo", net=99)
        group.add("pubh1", index=1, ovs={"mode": "system", "db_socket": str(sysovs.db_sock)})
        group.add("pubh2", index=2, attach=[{"name": "c1", "netns": lab.add_namespace("pubh2c1"), "mac": G2_MAC,
                                             "addresses": [f"{G2_IP}/16", f"{G2_IP6}/64"]}])
        for h in group.nodes:
            group.start(h)
        with logs_on_failure(group):
            assert wait_links(group, timeout=LINKS_TIMEOUT) is not None, "the link did not come up"
        yield lab, group, sysovs
    finally:
        if group:
            group.stop_all()
        if sysovs:
            sysovs.stop()
        lab.down()


def vsctl(lab: Lab, sysovs: OvsInstance, *args: str) -> str:
    """Plain ovs-vsctl against "the system's" database, as libvirt or a user runs it."""
    return lab.exec("pubh1", ["ovs-vsctl", f"--db=unix:{sysovs.db_sock}", *args]).stdout


def guests(lab: Lab, group: LabGroup, host: str = "pubh1") -> dict[str, dict]:
    return {g["name"]: g for g in status_json(lab, group, host)["overlays"][0]["guests"]}


def reaches(lab: Lab, ns: str, addr: str, wait: str = "1") -> bool:
    return lab.exec(ns, ["ping", "-c", "1", "-W", wait, addr], check=False, timeout=10).returncode == 0


def plug_vm(lab: Lab, sysovs: OvsInstance) -> float:
    """A "VM": a veth whose inner end (eth0) is in a namespace with an overlay address, its outer
    end vnet0 plugged into the overlay bridge exactly as libvirt does. Seconds to the first ping
    from it to the other node's guest."""
    ns = lab.add_namespace("pubh1vm")
    lab.exec("pubh1", ["ip", "link", "add", "vnet0", "mtu", "1400", "type", "veth", "peer", "name", "eth0",
                       "netns", ns])
    lab.exec("pubh1", ["ip", "link", "set", "vnet0", "up"])
    for argv in (["ip", "link", "set", "eth0", "address", VM_MAC, "mtu", "1400", "up"], ["ip", "link", "set", "lo", "up"],
                 ["ip", "addr", "add", f"{VM_IP}/16", "dev", "eth0"],
                 ["ip", "-6", "addr", "add", f"{VM_IP6}/64", "dev", "eth0", "nodad"]):
        lab.exec("pubh1vm", argv)
    t0 = time.monotonic()
    vsctl(lab, sysovs, "add-port", BR, "vnet0", "--", "set", "Interface", "vnet0",
          "external-ids:iface-id=vm1-net0", "external-ids:iface-status=active",
          f"external-ids:attached-mac={VM_MAC}", f"external-ids:vm-id={VM_UUID}")
    until(lambda: reaches(lab, "pubh1vm", G2_IP, wait="0.2"), 20, "the VM reaches the other node's guest",
          interval=0.02)
    return time.monotonic() - t0


def test_bridge_lives_in_the_running_ovs(world):
    lab, group, sysovs = world
    assert sorted(sysovs.bridges()) == [BR, "vmbr0"]
    assert sysovs.vsctl("get", "bridge", BR, "fail_mode").strip() == "secure"
    assert sysovs.vsctl("get", "bridge", BR, "other-config:datapath-id").strip().strip('"')
    # ovs-vswitchd accepts unix controllers only in its run directory: a private (0700) one there
    ctl = sysovs.vsctl("get-controller", BR).strip()
    assert ctl == f"unix:{sysovs.rundir}/switch-{BR}/ofp.sock", ctl
    state = group.nodes["pubh1"].dir / "state"
    assert (state / f"switch-{BR}.log").exists()            # its log stays with the node
    assert sysovs.ports("vmbr0") == ["keep0"]
    st = status_json(lab, group, "pubh1")
    assert st["node"]["ovs"] == f"system (unix:{sysovs.db_sock}), datapath netdev", st["node"]
    assert not (state / "ovs").exists(), "a private OVS was started"


def test_vm_plugged_with_ovs_vsctl_is_a_guest_and_reaches_the_other_node(world):
    lab, group, sysovs = world
    with logs_on_failure(group):
        took = plug_vm(lab, sysovs)
        print(f"\nVM plugged with ovs-vsctl: first ping to the other node's guest {took * 1000:.0f} ms after add-port")
        for addr in (G2_IP, G2_IP6, group.address("pubh2", "demo"), group.address("pubh2", "demo", v6=True),
                     group.address("pubh1", "demo")):
            assert until(lambda: reaches(lab, "pubh1vm", addr), 10, f"VM -> {addr}"), addr
        assert reaches(lab, "pubh2c1", VM_IP) and reaches(lab, "pubh2c1", VM_IP6)
        assert lab.exec("pubh2", ["ping", "-c", "1", "-W", "2", VM_IP], check=False).returncode == 0
        g = until(lambda: guests(lab, group)["vnet0"], 10, "vnet0 in status")
        assert g["kind"] == "ovs-port" and g["port"] == "vnet0" and g["mac"] == VM_MAC, g
        assert "vm1-net0" in g["where"] and VM_UUID in g["where"] and not g["dhcp_server"], g
        g = until(lambda: (lambda x: x if x.get("rx_frames") and VM_MAC in x.get("macs", []) else None)(
            guests(lab, group)["vnet0"]), 10, "the switch's view of vnet0")
        assert g["tx_frames"] > 0 and set(g["drops"]) >= {"dhcp", "ra", "spoof"}, g
        # a trusted DHCP server is marked on the interface
        vsctl(lab, sysovs, "set", "Interface", "vnet0", "external-ids:ipop-switch-dhcp-server=true")
        until(lambda: guests(lab, group)["vnet0"]["dhcp_server"], 10, "vnet0 marked DHCP-trusted")
        text = subprocess.run(["ip", "netns", "exec", lab.netns_of("pubh1"), sys.executable, "-m", "ipop_switch.cli",
                               "status", "-c", str(group.nodes["pubh1"].config)], capture_output=True, text=True,
                              timeout=30)
        assert "vnet0" in text.stdout and "OVS port" in text.stdout, text.stdout


def test_crashed_agents_bridge_is_taken_over_and_the_vm_stays(world):
    lab, group, sysovs = world
    with logs_on_failure(group):
        group.stop("pubh1", kill=True)
        left = sysovs.ports(BR)
        assert "vnet0" in left and any(p.startswith("ipt") for p in left), left   # the crash left them
        group.start("pubh1")
        assert wait_links(group, timeout=LINKS_TIMEOUT) is not None, "the link did not come back"
        ports = sysovs.ports(BR)
        assert "vnet0" in ports and len([p for p in ports if p.startswith("ipt")]) == 1, ports
        assert until(lambda: reaches(lab, "pubh1vm", G2_IP), 20, "the VM reaches the other guest again")
        assert guests(lab, group)["vnet0"]["kind"] == "ovs-port"


def test_unplugged_vm_goes_away(world):
    lab, group, sysovs = world
    vsctl(lab, sysovs, "del-port", BR, "vnet0")
    until(lambda: "vnet0" not in guests(lab, group), 10, "vnet0 gone from status")
    assert not reaches(lab, "pubh2c1", VM_IP)


def test_stop_removes_only_the_agents_bridge(world):
    lab, group, sysovs = world
    group.stop("pubh1")
    assert sysovs.running() and sysovs.bridges() == ["vmbr0"], sysovs.bridges()
    assert sysovs.ports("vmbr0") == ["keep0"]
    assert not [p for p in sysovs.vsctl("--columns=name", "--bare", "list", "Interface").split()
                if p.startswith(("ipt", "ipg", "vnet"))]
    node_dir = str(group.nodes["pubh1"].dir)
    assert subprocess.run(["pgrep", "-f", node_dir], capture_output=True).returncode == 1, "something of it runs on"
    assert not (sysovs.rundir / f"switch-{BR}").exists(), "the switch app's socket directory was left"
    monitors = subprocess.run(["pgrep", "-f", f"ovsdb-client monitor unix:{sysovs.db_sock}"], capture_output=True)
    assert monitors.returncode == 1, "the agent's OVS monitor outlived it (also the one of the killed agent)"


def test_missing_or_silent_db_socket_is_one_error_line(world, tmp_path):
    lab, group, sysovs = world
    doc = tomllib.loads(group.nodes["pubh1"].config.read_text())
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)      # accepts, never answers
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(4)
    try:
        for sock, words in ((tmp_path / "nope.sock", f"no Open vSwitch database socket at {tmp_path}/nope.sock"),
                            (tmp_path / "silent.sock", f"Open vSwitch at unix:{tmp_path}/silent.sock does not answer")):
            doc["ovs"]["db_socket"] = str(sock)
            doc["node"]["state_dir"] = str(tmp_path / "state")
            cfg = tmp_path / "node.toml"
            write_config(cfg, doc, header="test")
            t0 = time.monotonic()
            r = subprocess.run(["ip", "netns", "exec", lab.netns_of("pubh1"), sys.executable, "-m", "ipop_switch.cli",
                                "up", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
            err = [l for l in r.stderr.splitlines() if l.startswith("ipop-switch: error:")]
            assert r.returncode == 1 and len(err) == 1 and words in err[0], r.stderr
            assert "Traceback" not in r.stderr
            assert time.monotonic() - t0 < 20
    finally:
        silent.close()
    assert sysovs.bridges() == ["vmbr0"]
