"""32 real nodes on one machine in the structured overlay (issue 16, budgets): how long
until every node reaches every other, what each node costs once converged (CPU, RSS), the
graph they built, and an on-demand link's before/after throughput.

A lab of ``nodes`` public hosts (no NAT: the cost measured is the overlay's, not the
NATs'), every one running ``ipop-switch up`` with the default topology (all-to-all up to
8 members, a Symphony ring above). Nodes start in batches (33 agents starting at once
swamp 2 cores with their imports); convergence is timed from the last start until every
node's status says all members are reachable through the graph, then sampled pairs are
pinged. Idle cost: CPU of every node's processes over ``seconds`` (per node: the sum of its
agent, workers, switch app and OVS) and their RSS. Last, a pair of nodes 2+ hops apart
runs iperf3 for ``iperf_s`` seconds: the first seconds cross intermediate nodes, then the
on-demand link (threshold 1 MB/s by default) takes the flow over.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..lab import Lab, LabSpec, SiteSpec
from ..lab.nodes import LabGroup
from .idle import CLK_TCK, _cpu_ticks, _machine_busy
from .systems import node_pids

BATCH = 8
CONVERGE_TIMEOUT = 300.0
PAIRS = 24
SETTLE_TIMEOUT = 180.0       # after convergence: released links go after min_link_age (30 s)


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _topology(group: LabGroup, host: str) -> dict | None:
    try:
        return group.status(host)["overlays"][0]
    except Exception:
        return None


def _converged(group: LabGroup) -> tuple[bool, list[dict]]:
    ovs = [_topology(group, h) for h in group.nodes]
    n = len(group.nodes)
    ok = all(o and o.get("topology") and o["topology"]["members"] == n and o["topology"]["reachable"] == n - 1
             for o in ovs)
    return ok, [o for o in ovs if o]


def _ping(lab: Lab, host: str, addr: str) -> bool:
    return lab.exec(host, ["ping", "-c", "2", "-i", "0.3", "-W", "2", addr], check=False, timeout=20).returncode == 0


def _iperf_intervals(lab: Lab, a: str, b: str, addr_b: str, seconds: int) -> list[float]:
    """iperf3's per-second throughputs (Mbit/s) from a to b."""
    server = lab.popen(b, ["iperf3", "-s", "-1", "-B", addr_b], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        r = lab.exec(a, ["iperf3", "-c", addr_b, "-t", str(seconds), "-i", "1", "-J", "--connect-timeout", "3000"],
                     check=False, timeout=seconds + 30)
        try:
            return [iv["sum"]["bits_per_second"] / 1e6 for iv in json.loads(r.stdout)["intervals"]]
        except (ValueError, KeyError):
            return []
    finally:
        server.kill()
        server.wait(timeout=5)


def run_scale(*, nodes: int = 32, seconds: float = 30.0, iperf_s: int = 20, console: Console) -> dict:
    lab = Lab(LabSpec(name=f"scale{int(time.time()) % 10000}",
                      sites=tuple(SiteSpec(f"s{i}", "none") for i in range(1, nodes + 1))))
    group = None
    report: dict = {"nodes": nodes}
    try:
        with console.status(f"building a lab of {nodes} hosts ..."):
            lab.up()
        group = LabGroup(lab, "scale", net=93, extra={"no_turn": True, "worker_processes": 1})
        hosts = list(lab.hosts)
        for h in hosts:
            group.add(h)
        for i in range(0, nodes, BATCH):
            batch = hosts[i:i + BATCH]
            with console.status(f"starting nodes {i + 1}..{i + len(batch)} of {nodes} ..."):
                for h in batch:
                    group.start(h)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not all(_topology(group, h) for h in batch):
                    time.sleep(0.5)
        t_last = time.monotonic()
        with console.status("waiting until every node reaches every other through the graph ..."):
            deadline = t_last + CONVERGE_TIMEOUT
            ok, ovs = _converged(group)
            while not ok and time.monotonic() < deadline:
                time.sleep(1.0)
                ok, ovs = _converged(group)
        report["converged"] = ok
        report["converged_s"] = round(time.monotonic() - t_last, 1)
        topo = [o["topology"] for o in ovs if o.get("topology")]
        degrees = [t["degree"] for t in topo]
        report["degree_mean"] = round(sum(degrees) / max(1, len(degrees)), 2)
        report["degree_max"] = max(degrees, default=0)
        report["max_hops"] = max((t["max_hops"] for t in topo), default=0)
        report["links"] = sum(degrees) // 2
        report["lsa_messages_sent_mean"] = round(sum(t["sent"].get("lsa", 0) for t in topo) / max(1, len(topo)), 1)
        rng = random.Random(1)
        pairs = [tuple(rng.sample(hosts, 2)) for _ in range(PAIRS)]
        with console.status(f"pinging {PAIRS} sampled pairs ..."):
            bad = [f"{a}->{b}" for a, b in pairs if not _ping(lab, a, group.nodes[b].address.split("/")[0])]
        report["pairs_pinged"], report["pairs_unreachable"] = len(pairs), bad

        with console.status("waiting until no node's links change for 20 s (the policy settled) ..."):
            t_settle = time.monotonic()
            seqs, since = None, time.monotonic()
            while time.monotonic() - t_settle < SETTLE_TIMEOUT and time.monotonic() - since < 20.0:
                now_seqs = [((_topology(group, h) or {}).get("topology") or {}).get("lsa_seq") for h in hosts]
                if now_seqs != seqs:
                    seqs, since = now_seqs, time.monotonic()
                time.sleep(2.0)
            report["settled_s"] = round(time.monotonic() - t_settle, 1)
        with console.status(f"every node idle for {seconds:.0f} s: CPU and RSS ..."):
            pids = {h: node_pids(group, h) for h in hosts}
            c0 = {h: sum(_cpu_ticks(p) for p in ps) for h, ps in pids.items()}
            m0, t0 = _machine_busy(), time.monotonic()
            time.sleep(seconds)                     # the measured window itself
            c1 = {h: sum(_cpu_ticks(p) for p in ps) for h, ps in pids.items()}
            m1, dt = _machine_busy(), time.monotonic() - t0
        cpu = {h: 100.0 * (c1[h] - c0[h]) / CLK_TCK / dt for h in hosts}
        rss = {h: sum(_rss_kb(p) for p in ps) / 1024 for h, ps in pids.items()}
        report["idle_cpu_pct_mean"] = round(sum(cpu.values()) / nodes, 3)
        report["idle_cpu_pct_max"] = round(max(cpu.values()), 3)
        report["machine_busy_pct"] = round(100.0 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1]), 1)
        report["loadavg"] = os.getloadavg()
        report["rss_mb_mean"] = round(sum(rss.values()) / nodes, 1)
        report["rss_mb_max"] = round(max(rss.values()), 1)

        # an on-demand link under load: a pair 2+ hops apart
        far = None
        for o, h in zip(ovs, hosts):
            hops = (o.get("topology") or {}).get("hops") or {}
            by_id = {n.node_id: x for x, n in group.nodes.items()}
            cand = sorted((d, nid) for nid, d in hops.items() if d >= 2)
            if cand:
                far = (h, by_id[cand[-1][1]], cand[-1][0])
                break
        if far:
            a, b, hops_ab = far
            id_b = group.nodes[b].node_id
            with console.status(f"iperf3 {a} -> {b} ({hops_ab} hops) for {iperf_s} s ..."):
                t_io = time.monotonic()
                ivs = _iperf_intervals(lab, a, b, group.nodes[b].address.split("/")[0], iperf_s)
                st = _topology(group, a) or {}
                role = next((p.get("role") for p in st.get("peers", []) if p["node_id"] == id_b and p["state"] == "up"), None)
            report["ondemand"] = {"pair": f"{a}->{b}", "hops_before": hops_ab, "link_after": role,
                                  "intervals_mbit": [round(x, 1) for x in ivs],
                                  "before_mbit": round(sum(ivs[:2]) / 2, 1) if len(ivs) >= 2 else None,
                                  "after_mbit": round(sum(ivs[-5:]) / 5, 1) if len(ivs) >= 5 else None,
                                  "took_s": round(time.monotonic() - t_io, 1)}
    finally:
        with console.status("stopping the nodes and the lab ..."):
            if group:
                group.stop_all()
            lab.down()
    print_scale(report, console)
    return report


def print_scale(r: dict, console: Console) -> None:
    t = Table(title=f"{r['nodes']} real nodes, structured overlay (defaults), {os.cpu_count()} cores")
    t.add_column("figure")
    t.add_column("value")
    rows = [
        ("converged (all reach all through the graph)", f"{r.get('converged')} after {r.get('converged_s')} s from the last start"),
        ("links / degree mean / max / max hops", f"{r.get('links')} / {r.get('degree_mean')} / {r.get('degree_max')} / {r.get('max_hops')}"),
        ("sampled pairs pinged / unreachable", f"{r.get('pairs_pinged')} / {len(r.get('pairs_unreachable') or [])}"),
        ("LSA messages sent per node (whole run)", str(r.get("lsa_messages_sent_mean"))),
        ("links stopped changing (after the pings)", f"{r.get('settled_s')} s"),
        ("idle CPU per node, mean / max (% of a core)", f"{r.get('idle_cpu_pct_mean')} / {r.get('idle_cpu_pct_max')}"),
        ("machine busy while idle / load average", f"{r.get('machine_busy_pct')} % / {r.get('loadavg')}"),
        ("RSS per node, mean / max (MB, all its processes)", f"{r.get('rss_mb_mean')} / {r.get('rss_mb_max')}"),
    ]
    od = r.get("ondemand")
    if od:
        rows.append(("on-demand: iperf3 pair, hops before", f"{od['pair']}, {od['hops_before']}; link after: {od['link_after']}"))
        rows.append(("on-demand: Mbit/s first 2 s / last 5 s", f"{od['before_mbit']} / {od['after_mbit']}"))
        rows.append(("on-demand: per second", " ".join(str(x) for x in od["intervals_mbit"])))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
