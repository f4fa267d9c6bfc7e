"""``ipop-switch lab demo``, the README's main job, end to end through the real CLI: it
exits 0, every ping of its matrix (IPv4 and IPv6) succeeds, it reports the first ping
over the overlay and an iperf3 figure, and it removes its lab afterwards."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import unique_name
from ipop_switch.lab import list_labs, list_namespaces, ns_name

pytestmark = [pytest.mark.lab, pytest.mark.slow]

DEMO_TIMEOUT = 240.0        # README: about 16 s


def test_lab_demo_end_to_end(tmp_path):
    name = unique_name("d")
    out = tmp_path / "demo.json"
    r = subprocess.run([sys.executable, "-m", "ipop_switch.cli", "lab", "demo", "--name", name, "--json", str(out)],
                       capture_output=True, text=True, timeout=DEMO_TIMEOUT)
    # the lab is gone whatever the outcome: no state, no namespace of that name
    assert name not in list_labs()
    assert not [ns for ns in list_namespaces() if ns.startswith(ns_name(name, ""))]
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    res = json.loads(out.read_text())
    print(f"\nlab demo: first ping over the overlay {res['first_ping_s']} s after the agents started "
          f"(README: about 2 s), all links {res['all_links_s']} s, iperf3 {res['iperf_mbit']} Mbit/s")
    assert res["ok"] is True
    assert res["first_ping_s"] is not None and res["first_ping_s"] > 0
    assert res["all_links_s"] is not None
    assert res["iperf_mbit"] and res["iperf_mbit"] > 0
    # three hosts by default: every ordered pair, IPv4 and IPv6, each with an RTT
    pings = res["ping_ms"]
    assert len(pings) == 3 * 2, pings
    assert all(v4 is not None and v6 is not None and v4 > 0 and v6 > 0 for v4, v6 in pings.values()), pings
    # two guests per node by default (switch mode): each reaches the first guest of both other nodes
    gp = res["guest_ping_ms"]
    assert len(gp) == 3 * 2 * 2, gp
    assert all(v4 is not None and v6 is not None for v4, v6 in gp.values()), gp
    assert "demo OK" in r.stdout
