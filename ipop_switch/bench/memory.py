"""Memory of one node as its peers grow (design budget: <= 200 MB RSS with 32 peers,
<= 0.5 MB per further peer): a lab of public hosts, all running ``ipop-switch up`` in one
GroupVPN, the first node measured (agent, worker processes, switch app, private OVS) after
1, 8, 16 and 32 of its links are up. RSS double-counts pages shared between processes;
PSS (proportional set size) is printed beside it."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from ..lab import Lab, LabSpec, SiteSpec
from ..lab.nodes import LabGroup
from .systems import node_pids

STEP_TIMEOUT = 240.0


def _kb(pid: int, key: str, file: str) -> int:
    try:
        for line in open(f"/proc/{pid}/{file}"):
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def breakdown(group: LabGroup, host: str) -> dict:
    parts: dict[str, list[int]] = {}
    for pid in node_pids(group, host):
        try:
            cmd = open(f"/proc/{pid}/cmdline").read()
        except OSError:
            continue
        name = ("ovs" if "ovs" in cmd.split("\0")[0] else "workers" if "tunnel.poolproc" in cmd
                else "switch app" if "ryu_apps" in cmd else "agent" if "ipop_switch.cli" in cmd else "other")
        rss, pss = _kb(pid, "VmRSS:", "status"), _kb(pid, "Pss:", "smaps_rollup")
        acc = parts.setdefault(name, [0, 0])
        acc[0] += rss
        acc[1] += pss
    return {k: {"rss_mb": round(v[0] / 1024, 1), "pss_mb": round(v[1] / 1024, 1)} for k, v in parts.items()}


def _links_up(group: LabGroup, host: str) -> int:
    try:
        return sum(p["state"] == "up" for p in group.status(host)["overlays"][0]["peers"])
    except Exception:
        return 0


def run_memory(*, console: Console, steps: tuple[int, ...] = (1, 8, 16, 32)) -> dict:
    total = max(steps) + 1
    lab = Lab(LabSpec(name=f"mem{int(time.time()) % 10000}",
                      sites=tuple(SiteSpec(f"m{i}", "none") for i in range(1, total + 1))))
    group = None
    rows = {}
    try:
        with console.status(f"building a lab of {total} hosts ..."):
            lab.up()
        group = LabGroup(lab, "mem", net=95, extra={"no_turn": True, "worker_processes": 1,  # all-to-all: RSS per link
                                                 "topology": {"all_to_all_max": 33, "max_degree": 32}})
        hosts = list(lab.hosts)
        first = hosts[0]
        for h in hosts:
            group.add(h)
        group.start(first)
        started = 1
        for n in steps:
            with console.status(f"starting nodes until {first} has {n} links ..."):
                while started < n + 1:
                    group.start(hosts[started])
                    started += 1
                deadline = time.monotonic() + STEP_TIMEOUT
                while _links_up(group, first) < n and time.monotonic() < deadline:
                    time.sleep(1.0)
                time.sleep(3.0)   # let the new links settle (handshakes, first keepalives)
            up = _links_up(group, first)
            b = breakdown(group, first)
            rows[n] = {"links_up": up, "parts": b,
                       "rss_mb": round(sum(v["rss_mb"] for v in b.values()), 1),
                       "pss_mb": round(sum(v["pss_mb"] for v in b.values()), 1)}
    finally:
        with console.status("stopping the nodes and the lab ..."):
            if group:
                group.stop_all()
            lab.down()
    t = Table(title="memory of one node (userspace OVS, 1 worker process) as its links grow")
    parts = sorted({p for r in rows.values() for p in r["parts"]})
    for col in ("links", "RSS MB", "PSS MB", *[f"{p} RSS" for p in parts]):
        t.add_column(col)
    for n, r in rows.items():
        t.add_row(f"{r['links_up']}/{n}", str(r["rss_mb"]), str(r["pss_mb"]),
                  *[str(r["parts"].get(p, {}).get("rss_mb", "-")) for p in parts])
    console.print(t)
    ns = sorted(rows)
    if len(ns) >= 2 and rows[ns[-1]]["links_up"] == ns[-1]:
        per = (rows[ns[-1]]["rss_mb"] - rows[ns[0]]["rss_mb"]) / (ns[-1] - ns[0])
        console.print(f"growth: {per:.2f} MB RSS per further peer")
    return rows
