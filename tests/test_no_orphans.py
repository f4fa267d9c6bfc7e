"""No orphans: after ``kill -9`` of an agent, none of its processes (private
ovsdb-server and ovs-vswitchd, the switch app, the tunnel worker processes) survives
5 s, and the next start on the same node comes up cleanly.

The kernel does it (PR_SET_PDEATHSIG on every child the agent starts): nothing of the
agent runs after a SIGKILL to tidy up."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import unique_name
from helpers.agent_lab import agent_procs, wait_up
from helpers.wait import readline_within
from ipop_switch import proc
from ipop_switch.lab import Lab, LabSpec, SiteSpec, destroy_lab, list_labs, orphaned_labs
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


def test_a_killed_test_run_leaves_no_daemon_and_its_lab_is_found_and_removed():
    """A process that built a lab (as a test run, the demo or a bench does) dies by SIGKILL:
    the lab's Prosody and coturn end with it, and its namespaces are found as an orphaned
    lab (``lab down --orphans``, and every test run's start) and removed."""
    name = unique_name("k")
    owner = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from ipop_switch.lab import Lab, LabSpec, SiteSpec
lab = Lab(LabSpec(name={name!r}, sites=(SiteSpec("a", "none"),))).up()
print(lab.pids["prosody"], lab.pids["coturn"], flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        line = readline_within(owner.stdout, 30, "the lab to be up")
        daemons = [int(p) for p in line.split()]
        assert daemons and all(proc.alive(p) for p in daemons)
        assert name not in orphaned_labs()                 # its owner still runs
        owner.kill()
        owner.wait(timeout=10)
        t0 = time.monotonic()
        while any(proc.alive(p) for p in daemons) and time.monotonic() - t0 < ORPHAN_LIMIT:
            time.sleep(0.1)
        assert not any(proc.alive(p) for p in daemons), "Prosody or coturn outlived the run that started them"
        assert name in orphaned_labs()
        r = subprocess.run([sys.executable, "-m", "ipop_switch.cli", "lab", "down", "--orphans"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and f"lab {name}: removed" in r.stdout, r
        assert name not in list_labs()
    finally:
        owner.kill()
        destroy_lab(name)
