"""Probes of a running overlay in the lab, as a user would make them: ping and iperf3
inside a host's namespace, each node's status through its status socket. Used by the
demo, the benchmarks and the tests."""

from __future__ import annotations

import json
import re
import subprocess
import time

from ..errors import IpopError
from .lab import Lab
from .nodes import LabGroup

LINKS_TIMEOUT = 60.0


def wait_links(group: LabGroup, *, timeout: float = LINKS_TIMEOUT) -> float | None:
    """Seconds until every node has every other node's link up, or None on timeout."""
    t0 = time.monotonic()
    want = len(group.nodes) - 1
    while time.monotonic() - t0 < timeout:
        try:
            if all(sum(p["state"] == "up" for p in group.status(h)["overlays"][0]["peers"]) == want
                   for h in group.nodes):
                return time.monotonic() - t0
        except (IpopError, LookupError):
            pass  # an agent still starting: no status socket yet, or no overlay in its status
        time.sleep(0.2)
    return None


def ping(lab: Lab, host: str, addr: str, count: int = 3) -> float | None:
    r = lab.exec(host, ["ping", "-q", "-c", str(count), "-i", "0.2", "-W", "2", addr], check=False, timeout=30)
    m = re.search(r"= [\d.]+/([\d.]+)/", r.stdout)
    return float(m.group(1)) if m and r.returncode == 0 else None


def first_ping(lab: Lab, host: str, addr: str, *, timeout: float) -> float | None:
    """Seconds until ``host`` gets a ping reply from ``addr`` (one probe every 0.2 s)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if lab.exec(host, ["ping", "-c", "1", "-W", "0.2", addr], check=False, timeout=5).returncode == 0:
            return time.monotonic() - t0
    return None


def iperf(lab: Lab, a: str, b: str, addr_b: str, seconds: int = 5) -> float | None:
    server = lab.popen(b, ["iperf3", "-s", "-1", "-B", addr_b], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        r = lab.exec(a, ["iperf3", "-c", addr_b, "-t", str(seconds), "-J", "--connect-timeout", "3000"],
                     check=False, timeout=seconds + 30)
        try:
            return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
        except (ValueError, KeyError):
            return None
    finally:
        server.kill()
        server.wait(timeout=5)
