"""SIGTERM and SIGINT (Ctrl-C) stop a running agent cleanly (README: "SIGTERM/SIGINT remove
ports, TAPs and the private OVS"): it exits within a bounded time, and its bridge, TAPs,
private ovsdb-server/ovs-vswitchd, switch app and tunnel worker processes are all gone.

A real two-node group in the lab; the node under test is started fresh for each signal,
its peer keeps running, so each test sees a link that was up when the signal came."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import unique_name
from helpers.agent_lab import agent_procs, links, logs_on_failure, ovs_rundir, until, wait_up
from ipop_switch import proc
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.lab.nodes import LabGroup

pytestmark = pytest.mark.lab

UP_TIMEOUT = 30.0
EXIT_TIMEOUT = 15.0        # the agent's own stop steps are bounded by 15 + 10 s; a clean one takes ~1 s


@pytest.fixture(scope="module")
def pair():
    lab = Lab(LabSpec(name=unique_name("q"), sites=(SiteSpec("a", "none"), SiteSpec("b", "none"))))
    group = None
    try:
        lab.up()
        group = LabGroup(lab, "shut", net=95)
        for h in ("ah1", "bh1"):
            group.add(h)
        group.start("bh1")
        yield lab, group
    finally:
        if group:
            group.stop_all()
        lab.down()


def _send(pid: int, how: str) -> None:
    if how == "sigterm":
        os.kill(pid, signal.SIGTERM)              # kill, systemctl stop: the agent alone
    else:
        os.killpg(os.getpgid(pid), signal.SIGINT)  # Ctrl-C: the terminal signals the whole process group


@pytest.mark.parametrize("how", ["sigterm", "sigint"])
def test_signal_removes_ports_taps_ovs_and_children(pair, how):
    lab, g = pair
    log = g.nodes["ah1"].dir / "agent.log"
    start_at = log.stat().st_size if log.exists() else 0     # the log is appended to by each start
    node = g.start("ah1")
    try:
        with logs_on_failure(g):
            _check(lab, g, node, how, log, start_at)
    finally:
        g.stop("ah1")


def _check(lab: Lab, g: LabGroup, node, how: str, log: Path, start_at: int) -> None:
    """The link is up; send the signal; then everything of the node is gone."""
    peers = wait_up(g, UP_TIMEOUT)
    tap = peers["ah1"]["port"]
    bridge = g.status("ah1")["overlays"][0]["bridge"]
    procs = agent_procs(g, "ah1")
    # what must go is there now: the bridge with the TAP as a port, both devices, every process
    assert tap and tap in links(lab, "ah1") and bridge in links(lab, "ah1"), links(lab, "ah1")
    rundir = ovs_rundir(g, "ah1")
    ports = proc.run(["ovs-vsctl", f"--db=unix:{rundir / 'db.sock'}", "list-ports", bridge]).stdout.split()
    assert ports == [tap], ports
    assert procs.ovsdb and procs.vswitchd and len(procs.switch_apps) == 1 and procs.workers, procs
    assert set(procs.alive()) == set(procs.all()), procs

    t0 = time.monotonic()
    _send(node.proc.pid, how)
    try:
        rc = node.proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the agent did not exit within {EXIT_TIMEOUT:g} s of {how}") from None
    took = time.monotonic() - t0
    print(f"\n{how}: agent exited with {rc} after {took:.2f} s")
    assert rc == 0, f"exit status {rc}"
    # children may finish a moment after the agent; bounded
    until(lambda: not procs.alive(), 5.0, f"the node's processes to end: {procs.alive()}")
    left = [i for i in links(lab, "ah1") if i.startswith(("ipt", "ipsw")) or i in (tap, bridge)]
    assert not left, left
    assert not rundir.exists(), sorted(p.name for p in rundir.iterdir())
    assert not node.status_socket.exists()
    assert not (node.dir / "agent.pid").exists()
    # nothing of the node runs in its namespace any more (the peer runs in another one)
    assert proc.run(["ip", "netns", "pids", lab.netns_of("ah1")]).stdout.split() == []
    # and the peer was told: its link leaves "up"
    # (down, or gone altogether once the peer's leaving the room is seen too)
    until(lambda: all(p["state"] != "up" for p in g.status("bh1")["overlays"][0]["peers"]), 10.0,
          "bh1 to see the link go")
    mine = log.read_bytes()[start_at:].decode(errors="replace")
    assert "Traceback" not in mine and " ERROR " not in mine, mine[-3000:]
    # the agent stopped its worker processes: none ended on its own and was restarted mid-shutdown
    assert "restarting with" not in mine, mine[-3000:]
