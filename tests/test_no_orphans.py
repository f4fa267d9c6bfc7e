"""No orphans: after ``kill -9`` of an agent, none of its processes (private
ovsdb-server and ovs-vswitchd, the switch app, the tunnel worker processes) survives
5 s, and the next start on the same node comes up cleanly.

The kernel does it (PR_SET_PDEATHSIG on every child the agent starts): nothing of the
agent runs after a SIGKILL to tidy up."""

from __future__ import annotations

import time

import pytest

from conftest import unique_name
from helpers.agent_lab import agent_procs, wait_up
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.lab.nodes import LabGroup

pytestmark = pytest.mark.lab

UP_TIMEOUT = 30.0
ORPHAN_LIMIT = 5.0


def test_a_killed_agent_leaves_no_process_and_starts_again():
    lab = Lab(LabSpec(name=unique_name("o"), sites=(SiteSpec("a", "none"), SiteSpec("b", "none"))))
    group = None
    try:
        lab.up()
        group = LabGroup(lab, "orph", net=94)
        for h in ("ah1", "bh1"):
            group.add(h)
            group.start(h)
        wait_up(group, UP_TIMEOUT)
        procs = agent_procs(group, "ah1")
        assert procs.ovsdb and procs.vswitchd and procs.switch_apps and procs.workers, procs
        group.stop("ah1", kill=True)                      # SIGKILL: the agent runs no clean-up
        t0 = time.monotonic()
        while procs.alive() and time.monotonic() - t0 < ORPHAN_LIMIT:
            time.sleep(0.1)
        assert not procs.alive(), f"{ORPHAN_LIMIT:g} s after SIGKILL of the agent these still run: {procs.alive()}"
        print(f"\nall processes of the killed agent gone {time.monotonic() - t0:.2f} s after SIGKILL")
        # the next start finds what the dead agent left (its run directory, sockets, bridge)
        group.start("ah1")
        wait_up(group, UP_TIMEOUT)
    except AssertionError:
        for h, n in (group.nodes.items() if group else ()):
            log = n.dir / "agent.log"
            print(f"--- {h} agent.log (tail) ---\n" + ("".join(log.read_text().splitlines(True)[-25:]) if log.exists() else "none"))
        raise
    finally:
        if group:
            group.stop_all()
        lab.down()
