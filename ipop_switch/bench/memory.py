"""Memory of one node: as its peers grow (``run_memory``; design budget: <= 200 MB RSS with
32 peers, <= 0.5 MB per further peer: a lab of public hosts, all running ``ipop-switch up`` in
one GroupVPN, the first node measured after 1, 8, 16 and 32 of its links are up), and with one
peer, process by process (``run_footprint``: what each of agent, worker, switch app,
ovsdb-server and ovs-vswitchd holds, linked and after traffic).

RSS double-counts pages shared between processes; PSS (proportional set size) divides them
among the processes that map them, including processes of *other* nodes in the same lab (the
Python interpreter's and libraries' file pages), so in a lab it flatters a node. The honest
figure for one node alone on a machine is its distinct resident pages: the union of the
physical pages its processes map (``/proc/PID/pagemap``, root only), printed as "node MB"."""

from __future__ import annotations

import array
import time

from rich.console import Console
from rich.table import Table

from ..lab import Lab, LabSpec, SiteSpec
from ..lab.nodes import LabGroup
from .measure import iperf3
from .systems import node_pids

# all-to-all at every size up to 33 (the cost of N links at one node), links made as fast as
# the machine allows (the default policy makes 10 a minute, and gives a link 30 s to come up)
ALL_TO_ALL = {"all_to_all_max": 33, "max_degree": 32, "max_new_links_per_min": 64, "request_timeout": 300,
              "retry_backoff": 5}
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
                else "switch app" if "ryu_apps" in cmd else "agent" if "ipop_switch.cli" in cmd or "ipop_switch.agent" in cmd else "other")
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
                                                 "topology": ALL_TO_ALL})
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


# -- one node with one peer, process by process ---------------------------------------------

PFN_MASK = (1 << 55) - 1
PAGE_KB = 4


def role(pid: int) -> str:
    """Which part of a node a process is, from its command line."""
    try:
        argv = open(f"/proc/{pid}/cmdline").read().split("\0")
    except OSError:
        return "gone"
    cmd = " ".join(argv)
    if "ovsdb-server" in argv[0]:
        return "ovsdb-server"
    if "ovs-vswitchd" in argv[0]:
        return "ovs-vswitchd"
    if "tunnel.poolproc" in cmd:
        return "worker"
    if "ryu_apps" in cmd:
        return "switch app"
    if "ipop_switch.agent" in cmd or "ipop_switch.cli" in cmd or "ipop-switch" in cmd:
        return "agent"
    return "other"


def process_memory(pid: int) -> dict[str, int]:
    """kB: RSS, PSS, USS (private clean + dirty: what ending the process frees) and swap."""
    out = {"rss": _kb(pid, "VmRSS:", "status"), "pss": 0, "uss": 0, "swap": 0}
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            k, _, v = line.partition(":")
            if k == "Pss":
                out["pss"] = int(v.split()[0])
            elif k in ("Private_Clean", "Private_Dirty"):
                out["uss"] += int(v.split()[0])
            elif k == "Swap":
                out["swap"] = int(v.split()[0])
    except OSError:
        pass
    return out


def resident_frames(pid: int) -> set[int]:
    """The physical page frames ``pid`` has resident (needs root: others read PFN 0)."""
    frames: set[int] = set()
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        with open(f"/proc/{pid}/pagemap", "rb") as pm:
            for line in maps:
                lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
                if lo >= 1 << 47:                        # [vsyscall]: not in pagemap
                    continue
                pm.seek(lo // 4096 * 8)
                a = array.array("Q")
                a.frombytes(pm.read((hi - lo) // 4096 * 8))
                frames.update(e & PFN_MASK for e in a if e >> 63)
    except (OSError, ValueError):
        pass
    frames.discard(0)
    return frames


def footprint(pids: list[int]) -> dict:
    """Per process and per role (kB sums), and the node's distinct resident pages (MB)."""
    procs, union = [], set()
    for pid in pids:
        m = process_memory(pid)
        f = resident_frames(pid)
        union |= f
        procs.append({"pid": pid, "role": role(pid), **m, "frames": len(f)})
    roles: dict[str, dict[str, float]] = {}
    for p in procs:
        r = roles.setdefault(p["role"], {"n": 0, "rss": 0, "pss": 0, "uss": 0})
        r["n"] += 1
        for k in ("rss", "pss", "uss"):
            r[k] += p[k]
    mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
    return {"roles": {k: {"processes": v["n"], "rss_mb": mb(v["rss"]), "pss_mb": mb(v["pss"]),
                          "uss_mb": mb(v["uss"])} for k, v in roles.items()},
            "rss_mb": mb(sum(p["rss"] for p in procs)), "pss_mb": mb(sum(p["pss"] for p in procs)),
            "uss_mb": mb(sum(p["uss"] for p in procs)), "node_mb": mb(len(union) * PAGE_KB),
            "swap_mb": mb(sum(p["swap"] for p in procs))}


ROLE_ORDER = ("agent", "worker", "switch app", "ovs-vswitchd", "ovsdb-server", "other")


def print_footprint(rows: dict[str, dict], console: Console, title: str) -> None:
    t = Table(title=title)
    for col in ("process", *[f"{ph} {m}" for ph in rows for m in ("RSS", "PSS", "USS")]):
        t.add_column(col, justify="left" if col == "process" else "right")
    names = [r for r in ROLE_ORDER if any(r in ph["roles"] for ph in rows.values())]
    for name in names:
        cells = []
        for ph in rows.values():
            r = ph["roles"].get(name)
            cells += [str(r["rss_mb"]), str(r["pss_mb"]), str(r["uss_mb"])] if r else ["-"] * 3
        n = max(ph["roles"].get(name, {}).get("processes", 0) for ph in rows.values())
        t.add_row(name + (f" (x{n})" if n > 1 else ""), *cells)
    t.add_row("node (sum)", *[c for ph in rows.values() for c in (str(ph["rss_mb"]), str(ph["pss_mb"]), str(ph["uss_mb"]))])
    console.print(t)
    for ph, r in rows.items():
        console.print(f"{ph}: node's distinct resident pages {r['node_mb']} MB (RSS sum {r['rss_mb']}, "
                      f"PSS sum {r['pss_mb']}, swap {r['swap_mb']})")


def run_footprint(*, console: Console, seconds: float = 3.0, worker_processes: int = 1,
                  env: dict[str, str] | None = None) -> dict:
    """Two public hosts, one GroupVPN link between them (as the bench runs it: TURN configured,
    the path direct); the first node measured once linked and again after ``seconds`` of TCP.
    ``env`` goes to both agents and so to every process they start (e.g. MALLOC_ARENA_MAX)."""
    lab = Lab(LabSpec(name=f"fp{int(time.time()) % 10000}", sites=(SiteSpec("f1", "none"), SiteSpec("f2", "none"))))
    group = None
    rows: dict[str, dict] = {}
    try:
        with console.status("building a lab of 2 hosts ..."):
            lab.up()
        group = LabGroup(lab, "fp", net=94, extra={"worker_processes": worker_processes})
        a, b = list(lab.hosts)
        for h in (a, b):
            group.add(h)
        with console.status("starting two nodes until their link is up ..."):
            for h in (a, b):
                group.start(h, env=env)
            deadline = time.monotonic() + STEP_TIMEOUT
            while (_links_up(group, a) < 1 or _links_up(group, b) < 1) and time.monotonic() < deadline:
                time.sleep(0.5)
            if _links_up(group, a) < 1:
                raise RuntimeError("the link did not come up")
            time.sleep(3.0)                # handshakes, first keepalives, the switch app's flows
        rows["linked"] = footprint(node_pids(group, a))
        with console.status(f"{seconds:.0f} s of TCP over the link ..."):
            t = iperf3(lab, a, b, group.nodes[b].ip, seconds=seconds)
            time.sleep(1.0)
        rows["after traffic"] = footprint(node_pids(group, a))
        rows["after traffic"]["mbit"] = round(t.mbit, 1)
    finally:
        with console.status("stopping the nodes and the lab ..."):
            if group:
                group.stop_all()
            lab.down()
    print_footprint(rows, console, f"memory of one node with one peer ({worker_processes} worker process), MB")
    return rows
