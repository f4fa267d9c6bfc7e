"""Review findings 3 and 5 through the real agent (``ipop-switch up``): its bridge's
controller is the app's private unix socket (no TCP listener), and the agent's status
shows the switch app's counters, drop reasons included (macs_refused, packet_in_dropped,
datapaths_refused). Two public hosts, one GroupVPN overlay."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from conftest import unique_name
from helpers.agent_lab import agent_procs, logs_on_failure, ovs_rundir, ping_ok, status_json, wait_up
from ipop_switch import proc
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.lab.nodes import LabGroup

pytestmark = [pytest.mark.lab, pytest.mark.slow]
A, B = "ah1", "bh1"


@pytest.fixture(scope="module")
def pair():
    lab = Lab(LabSpec(name=unique_name("w"), sites=(SiteSpec("a", "none"), SiteSpec("b", "none"))))
    group = None
    try:
        lab.up()
        group = LabGroup(lab, "sw", net=93)
        for h in (A, B):
            group.add(h)
            group.start(h)
        with logs_on_failure(group):
            wait_up(group, 30)
        yield lab, group
    finally:
        if group:
            group.stop_all()
        lab.down()


def test_agent_controller_is_private_and_status_shows_the_switch_counters(pair):
    lab, g = pair
    assert ping_ok(lab, A, g.nodes[B].ip) and ping_ok(lab, B, g.nodes[A].ip)
    for h in (A, B):
        st = status_json(lab, g, h)
        ov = st["overlays"][0]
        sw = ov["switch"]
        for key in ("macs_refused", "packet_in_dropped", "datapaths_refused", "bad_frames", "neighbours_evicted"):
            assert sw[key] == 0, (h, key, sw)
        assert sw["macs_learned"] >= 2 and sw["packet_in"] > 0, sw  # both bridges' MACs at least
        rundir = ovs_rundir(g, h)
        db = f"--db=unix:{rundir / 'db.sock'}"
        target = proc.run(["ovs-vsctl", db, "get-controller", ov["bridge"]]).stdout.strip()
        assert target.startswith("unix:"), target
        sock = target[len("unix:"):]
        d = Path(sock).parent
        assert stat.S_IMODE(d.stat().st_mode) == 0o700 and stat.S_IMODE(Path(sock).stat().st_mode) == 0o600
        apps = agent_procs(g, h).switch_apps
        assert len(apps) == 1
        listening = lab.exec(h, ["ss", "-ltnpH"]).stdout
        assert f"pid={apps[0]}," not in listening, listening  # no TCP port at all (was 127.0.0.1:6653)
