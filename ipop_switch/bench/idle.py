"""What an idle node costs (issue 16, item 1; budget: under 1 % CPU with 32 links).

A lab of public hosts all running ``ipop-switch up`` in one GroupVPN (as the memory bench
builds it), so the first node has ``links`` links; once every node has all its links up
and nothing flows, the first node's processes (agent, switch app, tunnel worker(s),
ovs-vswitchd, ovsdb-server) are watched for ``seconds``: CPU time from /proc/PID/stat
(utime + stime, every thread), wake-ups from the context switches of every thread, and the
UDP datagrams its namespace sent and received (/proc/net/snmp read inside it: tunnel
keepalives, ICE consent checks, TURN refreshes; XMPP is TCP). CPU % is of one core (the
machine has ``os.cpu_count()``); the whole machine's load is printed beside it, because
the other nodes run on the same cores.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..lab import Lab, LabSpec, SiteSpec
from ..lab.nodes import LabGroup
from .systems import node_pids

# all-to-all at every size up to 33 (the cost of N links at one node), links made as fast as
# the machine allows (the default policy makes 10 a minute, and gives a link 30 s to come up)
ALL_TO_ALL = {"all_to_all_max": 33, "max_degree": 32, "max_new_links_per_min": 64, "request_timeout": 300,
              "retry_backoff": 5}
STEP_TIMEOUT = 240.0
BATCH = 8                     # nodes started at once (33 agents starting together swamp 2 cores)
SETTLE = 10.0                 # after the last link is up: first rekeys, handshakes, flow set-up done
BUDGET_PCT = 1.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    exe = os.path.basename(argv[0].decode(errors="replace"))
    cmd = b" ".join(argv)
    if exe in ("ovs-vswitchd", "ovsdb-server"):
        return exe
    if b"tunnel.poolproc" in cmd:
        return "worker"
    if b"ryu_apps" in cmd or b"osken" in cmd:
        return "switch app"
    if b"ipop_switch.cli" in cmd or b"ipop_switch.agent" in cmd:
        return "agent"
    return exe


def _cpu_ticks(pid: int) -> int:
    """utime + stime of the process (all its threads), in clock ticks; 0 if it is gone."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])
    except (OSError, IndexError, ValueError):
        return 0


def _switches(pid: int) -> int:
    """Context switches of every thread (voluntary + not): about one per wake-up when idle."""
    n = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0
    for t in tasks:
        try:
            for line in (t / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    n += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return n


def _udp(lab: Lab, host: str) -> tuple[int, int]:
    """(datagrams received, sent) by the host's namespace so far."""
    out = subprocess.run(["ip", "netns", "exec", lab.netns_of(host), "cat", "/proc/net/snmp"],
                         capture_output=True, text=True, timeout=10).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("Udp:")]
    if len(rows) < 2:
        return 0, 0
    d = dict(zip(rows[0][1:], rows[1][1:]))
    return int(d.get("InDatagrams", 0)), int(d.get("OutDatagrams", 0))


def _machine_busy() -> tuple[int, int]:
    """(busy, total) ticks of all CPUs."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return sum(f) - idle, sum(f)


def _links_up(group: LabGroup, host: str) -> int:
    try:
        return sum(p["state"] == "up" for p in group.status(host)["overlays"][0]["peers"])
    except Exception:
        return 0


def measure(group: LabGroup, lab: Lab, host: str, seconds: float) -> dict:
    """CPU %, wake-ups/s and UDP datagrams/s of ``host``'s node over ``seconds``."""
    pids = {pid: _role(pid) for pid in node_pids(group, host)}
    t0, c0 = time.monotonic(), {p: (_cpu_ticks(p), _switches(p)) for p in pids}
    u0, m0 = _udp(lab, host), _machine_busy()
    deadline = t0 + seconds
    while time.monotonic() < deadline:          # the measured window itself: nothing to wait for
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    t1, c1 = time.monotonic(), {p: (_cpu_ticks(p), _switches(p)) for p in pids}
    u1, m1 = _udp(lab, host), _machine_busy()
    dt = t1 - t0
    procs: dict[str, dict] = {}
    for p, role in pids.items():
        if c1[p][0] == 0 and c0[p][0] > 0:
            continue                             # ended meanwhile
        acc = procs.setdefault(role, {"pids": [], "cpu_pct": 0.0, "wakeups_s": 0.0})
        acc["pids"].append(p)
        acc["cpu_pct"] += 100.0 * (c1[p][0] - c0[p][0]) / CLK_TCK / dt
        acc["wakeups_s"] += (c1[p][1] - c0[p][1]) / dt
    for v in procs.values():
        v["cpu_pct"], v["wakeups_s"] = round(v["cpu_pct"], 3), round(v["wakeups_s"], 1)
    total = round(sum(v["cpu_pct"] for v in procs.values()), 3)
    ovs = sum(v["cpu_pct"] for k, v in procs.items() if k.startswith("ovs"))
    return {"seconds": round(dt, 1), "processes": procs, "total_cpu_pct": total,
            "without_ovs_cpu_pct": round(total - ovs, 3),
            "udp_in_s": round((u1[0] - u0[0]) / dt, 2), "udp_out_s": round((u1[1] - u0[1]) / dt, 2),
            "machine_busy_pct": round(100.0 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1]), 1)}


def run_idle(*, links: int = 32, seconds: float = 30.0, console: Console) -> dict:
    """Bring up ``links + 1`` nodes all-to-all, wait until every link is up, then measure the
    first node idle. Returns the figures (also printed as a table)."""
    total = links + 1
    lab = Lab(LabSpec(name=f"idle{int(time.time()) % 10000}",
                      sites=tuple(SiteSpec(f"i{i}", "none") for i in range(1, total + 1))))
    group = None
    report: dict = {"links": links}
    try:
        with console.status(f"building a lab of {total} hosts ..."):
            lab.up()
        group = LabGroup(lab, "idle", net=94, extra={"no_turn": True,  # all-to-all: the cost of N links at one node
                                                  "topology": ALL_TO_ALL})
        hosts = list(lab.hosts)
        first = hosts[0]
        for h in hosts:
            group.add(h)
        t_start = time.monotonic()
        group.start(first)
        for i in range(1, total, BATCH):
            batch = hosts[i:i + BATCH]
            with console.status(f"starting nodes {i + 1}..{i + len(batch)} of {total} ..."):
                for h in batch:
                    group.start(h)
                want = i + len(batch) - 1
                deadline = time.monotonic() + STEP_TIMEOUT
                while _links_up(group, first) < want and time.monotonic() < deadline:
                    time.sleep(1.0)
        with console.status("waiting until every node has all its links up ..."):
            deadline = time.monotonic() + STEP_TIMEOUT
            while time.monotonic() < deadline:
                ups = [_links_up(group, h) for h in hosts]
                if min(ups) >= links:
                    break
                time.sleep(2.0)
            report["links_up"] = _links_up(group, first)
            report["nodes_complete"] = sum(_links_up(group, h) >= links for h in hosts)
            report["converged_s"] = round(time.monotonic() - t_start, 1)
        with console.status(f"settling {SETTLE:.0f} s, then measuring {first} idle for {seconds:.0f} s ..."):
            time.sleep(SETTLE)
            report.update(measure(group, lab, first, seconds))
        report["links_up_after"] = _links_up(group, first)
    finally:
        with console.status("stopping the nodes and the lab ..."):
            if group:
                group.stop_all()
            lab.down()
    print_idle(report, console)
    return report


def print_idle(r: dict, console: Console) -> None:
    t = Table(title=f"one idle node with {r.get('links_up', '?')}/{r['links']} links up, "
                    f"{r.get('seconds', '?')} s, CPU % of one core ({os.cpu_count()} cores)")
    for col in ("process", "pids", "CPU %", "wake-ups/s"):
        t.add_column(col)
    for role, v in sorted(r.get("processes", {}).items()):
        t.add_row(role, " ".join(map(str, v["pids"])), f"{v['cpu_pct']:.2f}", f"{v['wakeups_s']:.1f}")
    t.add_row("total", "", f"{r.get('total_cpu_pct', 0):.2f}", "")
    console.print(t)
    if "total_cpu_pct" in r:
        ok = r["total_cpu_pct"] < BUDGET_PCT
        console.print(f"total {r['total_cpu_pct']:.2f} % ({'within' if ok else 'over'} the {BUDGET_PCT:.0f} % budget), "
                      f"without OVS {r['without_ovs_cpu_pct']:.2f} %; UDP {r['udp_out_s']}/s out, "
                      f"{r['udp_in_s']}/s in; whole machine busy {r['machine_busy_pct']} % "
                      f"({r.get('nodes_complete')}/{r['links'] + 1} nodes with all links up, "
                      f"converged after {r.get('converged_s')} s; links up at the end: {r.get('links_up_after')})")
