"""Quick benchmark of one tunnel link under the test harness (no agent, no switch app): setup time, ping RTT, iperf3 through the link vs
the underlay, dead-path detection and recovery, node RSS with 1/8/32 links.

Runs its own lab (a LAN site with two hosts behind an easy NAT, a site behind a hard NAT),
one link_node harness per host (tests/helpers: a WorkerPool + a private OVS, standing in
for the agent), and prints one JSON report. Usage (root):

    .venv/bin/python tests/link_bench.py [--tries 10] [--seconds 10] [--outage 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
from pathlib import Path

from helpers.link_harness import Mesh   # tests/ is this script's directory, so on sys.path

from ipop_switch import proc
from ipop_switch.lab import Lab, LabSpec, SiteSpec


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


async def node_rss_mb(node) -> float:
    p = await node.req("pids")
    pids = [p["self"], *p["pids"], *p["ovs"]]
    return round(sum(rss_kb(x) for x in pids) / 1024, 1)


def ping_stats(out: str) -> float | None:
    for line in out.splitlines():
        if line.startswith("rtt") or line.startswith("round-trip"):
            return float(line.split("=")[1].split("/")[1])
    return None


def iperf(lab: Lab, server_host: str, client_host: str, addr: str, seconds: int) -> float:
    srv = lab.popen(server_host, ["iperf3", "-s", "-1", "-B", addr], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        r = lab.exec(client_host, ["iperf3", "-c", addr, "-t", str(seconds), "-J"], timeout=seconds + 30, check=False)
        res = json.loads(r.stdout)
        return round(res["end"]["sum_received"]["bits_per_second"] / 1e6, 1)
    finally:
        srv.kill()
        srv.wait(5)


async def setup_times(mesh: Mesh, a: str, b: str, tries: int, base: int) -> tuple[list[float], str]:
    times, path = [], ""
    for i in range(tries):
        lp = await mesh.open(a, b, index=base + i, bridge=(i == 0))
        ea, eb = await mesh.wait_up(lp, 30)
        times.append(max(ea["t"], eb["t"]) - lp.opened_at)
        path = ea["path"]
        for n in (lp.a, lp.b):
            await n.req("close", link_id=lp.link_id)
    return times, path


async def main(args) -> dict:
    spec = LabSpec(name="lkbench", sites=(SiteSpec("lan", "easy", hosts=2), SiteSpec("hd", "hard")))
    lab = Lab(spec).up()
    report: dict = {}
    mesh = Mesh(lab)
    try:
        await mesh.start(["lanh1", "lanh2", "hdh1"], processes=args.processes)
        # 1. setup time, p50 over N tries, LAN and across NATs (easy <-> hard: relay)
        lan, lan_path = await setup_times(mesh, "lanh1", "lanh2", args.tries, 100)
        nat, nat_path = await setup_times(mesh, "lanh1", "hdh1", args.tries, 200)
        report["setup_s"] = {"lan_p50": round(statistics.median(lan), 3), "lan_path": lan_path,
                             "nat_p50": round(statistics.median(nat), 3), "nat_path": nat_path,
                             "lan_all": [round(x, 3) for x in lan], "nat_all": [round(x, 3) for x in nat]}
        # 2. one link on the LAN: ping and iperf3 through it vs the underlay
        lp = await mesh.open("lanh1", "lanh2", index=1)
        await mesh.wait_up(lp, 30)
        await mesh.ping("lanh1", lp.addr_b, count=3)
        under_ip = lab.host("lanh2").lan_ip
        r_link = await mesh.ping("lanh1", lp.addr_b, count=20, timeout=20)
        r_under = await mesh.ping("lanh1", under_ip, count=20, timeout=20)
        report["ping_ms"] = {"link": ping_stats(r_link.stdout), "underlay": ping_stats(r_under.stdout)}
        report["iperf3_mbit"] = {
            "link": await asyncio.to_thread(iperf, lab, "lanh2", "lanh1", lp.addr_b, args.seconds),
            "underlay": await asyncio.to_thread(iperf, lab, "lanh2", "lanh1", under_ip, args.seconds)}
        st = await lp.a.link_stats(lp.link_id)
        report["link_stats"] = {k: st[k] for k in ("path", "local", "remote", "rtt_ms", "drops")}
        # 3. across NATs: dead-path detection and recovery after an outage
        if args.outage:
            np = await mesh.open("lanh1", "hdh1", index=2)
            await mesh.wait_up(np, 30)
            since = (len(np.a.events), len(np.b.events))
            rules = "table ip outage {\n chain block {\n  type filter hook forward priority -5; policy accept;\n  meta l4proto udp drop\n }\n}\n"
            proc.run(["nft", "-f", "-"], netns=lab.netns_of("hdr"), input=rules)
            t0 = time.monotonic()
            down = await np.a.wait_event(lambda e: e.get("ev") == "down" and e.get("link_id") == np.link_id,
                                         15, "down", since[0])
            await asyncio.sleep(max(0.0, args.outage - (time.monotonic() - t0)))
            proc.run(["nft", "delete", "table", "ip", "outage"], netns=lab.netns_of("hdr"))
            t1 = time.monotonic()
            ea, eb = await mesh.wait_up(np, 30, since=since)
            report["outage"] = {"seconds": args.outage, "detect_s": round(down["t"] - t0, 2),
                                "recover_s": round(max(ea["t"], eb["t"]) - t1, 2), "path": ea["path"]}
            for n in (np.a, np.b):
                await n.req("close", link_id=np.link_id)
        # 4. RSS of one node (harness as agent + pool processes + OVS) with 1, 8, 32 links
        rss = {"links_1": await node_rss_mb(lp.a)}
        opened = 1
        for target in (8, 32):
            new = []
            for i in range(opened, target):
                new.append(await mesh.open("lanh1", "lanh2", index=300 + i, bridge=False))
            for x in new:
                await mesh.wait_up(x, 60)
            opened = target
            await asyncio.sleep(2)
            rss[f"links_{target}"] = await node_rss_mb(lp.a)
        rss["per_link_mb_8_to_32"] = round((rss["links_32"] - rss["links_8"]) / 24, 3)
        rss["processes"] = args.processes
        report["rss_mb"] = rss
    finally:
        await mesh.stop()
        lab.down()
    return report


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tries", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--outage", type=float, default=20.0)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    rep = asyncio.run(main(a))
    out = json.dumps(rep, indent=1)
    print(out)
    if a.json:
        Path(a.json).write_text(out)
