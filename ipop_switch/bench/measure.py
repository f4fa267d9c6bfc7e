"""One measurement each: iperf3 TCP throughput, ping RTT, CPU seconds of a set of pids."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .. import proc
from ..lab import Lab

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes and their reaped children's (from /proc)."""
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return total / CLK_TCK


def agent_pids(agent: subprocess.Popen | None, node_dir: Path) -> list[int]:
    """An agent's pid and those of the processes that run for it, whose CPU the bench charges
    to it: workers, switch app, ovsdb-server, ovs-vswitchd (its node directory in their command
    line, or a child of one of them)."""
    pids = [agent.pid] if agent else []
    needle = str(node_dir).encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            pid = int(d.name)
            if pid not in pids and (needle in cmd or ppid in pids) and proc.alive(pid):
                pids.append(pid)
    return pids


@dataclass
class Throughput:
    mbit: float
    retransmits: int
    cpu_a: float
    cpu_b: float


def iperf3(lab: Lab, a: str, b: str, addr_b: str, *, streams: int = 1, seconds: float = 10,
           pids_a: list[int] = (), pids_b: list[int] = (), port: int = 5201, bind_b: str | None = None) -> Throughput:
    """TCP from a to b for ``seconds``; the server lives only for this run. ``bind_b``: the
    address the server binds when b sees itself elsewhere than a sees it (SocialVPN)."""
    bind_b = bind_b or addr_b
    server = lab.popen(b, ["iperf3", "-s", "-1", "-B", bind_b, "-p", str(port)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ns_b = lab.netns_of(b)
        proc.wait_for(lambda: bool(proc.run(["ss", "-H", "-ltn", "src", f"{bind_b}:{port}"], netns=ns_b, check=False).stdout.strip()),
                      timeout=10, what="iperf3 server")
        ca, cb = cpu_seconds(list(pids_a)), cpu_seconds(list(pids_b))
        r = lab.exec(a, ["iperf3", "-c", addr_b, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J",
                         "--connect-timeout", "5000"], check=False, timeout=seconds + 30)
        ca, cb = cpu_seconds(list(pids_a)) - ca, cpu_seconds(list(pids_b)) - cb
        try:
            data = json.loads(r.stdout)
            end = data["end"]
            return Throughput(end["sum_received"]["bits_per_second"] / 1e6, end["sum_sent"].get("retransmits", 0), ca, cb)
        except (ValueError, KeyError):
            return Throughput(0.0, 0, ca, cb)
    finally:
        server.kill()
        server.wait(timeout=5)


def ping_rtt(lab: Lab, a: str, addr_b: str, *, count: int = 20, interval: float = 0.05) -> float | None:
    """Average RTT in ms, or None when nothing came back."""
    r = lab.exec(a, ["ping", "-q", "-c", str(count), "-i", str(interval), "-W", "2", addr_b], check=False,
                 timeout=count * interval + 20)
    m = re.search(r"= [\d.]+/([\d.]+)/", r.stdout)
    return float(m.group(1)) if m else None


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total / 1024


def tcp_under_udp_flood(lab: Lab, a: str, b: str, addr_b: str, *, seconds: float = 10,
                        bind_b: str | None = None) -> dict:
    """One TCP stream a -> b while an unthrottled UDP flood (iperf3 -u -b 0) runs a -> b too."""
    bind_b = bind_b or addr_b
    flood_srv = lab.popen(b, ["iperf3", "-s", "-1", "-B", bind_b, "-p", "5202"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flood = None
    try:
        ns_b = lab.netns_of(b)
        proc.wait_for(lambda: bool(proc.run(["ss", "-H", "-ltn", "src", f"{bind_b}:5202"], netns=ns_b, check=False).stdout.strip()),
                      timeout=10, what="iperf3 flood server")
        flood = lab.popen(a, ["iperf3", "-c", addr_b, "-p", "5202", "-u", "-b", "0", "-l", "1300",
                              "-t", str(seconds + 2), "-J"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(1.0)
        t = iperf3(lab, a, b, addr_b, streams=1, seconds=seconds, bind_b=bind_b)
        out, _ = flood.communicate(timeout=seconds + 30)
        try:
            udp = json.loads(out)["end"]["sum"]
            flood_mbit = udp["bits_per_second"] / 1e6
            lost = udp.get("lost_percent")
        except (ValueError, KeyError):
            flood_mbit, lost = None, None
        return {"tcp_mbit": round(t.mbit, 1), "flood_offered_mbit": round(flood_mbit, 1) if flood_mbit else None,
                "flood_lost_pct": round(lost, 1) if lost is not None else None}
    finally:
        for p in (flood, flood_srv):
            if p and p.poll() is None:
                p.kill()
                p.wait(timeout=5)
