"""``ipop-switch bench``: one lab, every system up side by side, runs interleaved.

The machine's speed drifts by ~25% within minutes (seen on these lab machines), so
systems are measured round-robin within each round, never one after the other
in blocks, and min/median/max are reported.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .. import proc
from ..lab import Lab, LabSpec
from .measure import iperf3, ping_rtt, rss_mb, tcp_under_udp_flood
from .peers import System, TincSwitch, Underlay, WireguardGo

PEERS: dict[str, type[System]] = {"underlay": Underlay, "wireguard-go": WireguardGo, "tinc": TincSwitch}
PACKAGES = {"wireguard-go": ("wireguard-go", "wireguard-go"), "wg": ("wg", "wireguard-tools"),
            "tincd": ("tincd", "tinc"), "iperf3": ("iperf3", "iperf3")}
NEEDS = {"wireguard-go": ("wireguard-go", "wg"), "tinc": ("tincd",)}    # system -> binaries beside iperf3


def ensure_packages(console: Console, systems: list[str]) -> None:
    """Install the Debian packages of the systems to measure when missing (the bench runs as
    root); a peer that is not measured is not installed."""
    binaries = {"iperf3", *(b for s in systems for b in NEEDS.get(s, ()))}
    missing = sorted({PACKAGES[b][1] for b in binaries if not shutil.which(PACKAGES[b][0])})
    if not missing:
        return
    console.print(f"installing {', '.join(missing)} ...")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    proc.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env, timeout=600)


@dataclass
class Result:
    name: str
    tcp1: list[float] = field(default_factory=list)
    tcp4: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)    # CPU seconds (both sides) per second of transfer
    ping_ms: float | None = None
    rss_mb: float | None = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        def mmm(xs):
            return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)} if xs else None
        return {"tcp1_mbit": mmm(self.tcp1), "tcp4_mbit": mmm(self.tcp4),
                "cpu_per_s": statistics.median(self.cpu) if self.cpu else None,
                "ping_ms": self.ping_ms, "rss_mb": self.rss_mb, **self.extra}


def run_bench(*, systems: list[str], runs: int = 3, seconds: float = 10.0, console: Console,
              extra_systems: dict[str, type[System]] | None = None,
              variants: tuple[str, ...] = ("relay", "loss1")) -> dict:
    proc.require_root()
    ensure_packages(console, systems)
    registry = {**PEERS, **(extra_systems or {})}
    unknown = [s for s in systems if s not in registry]
    if unknown:
        raise proc.IpopError(f"unknown system(s) {unknown}; known: {', '.join(registry)}")
    workdir = Path(tempfile.mkdtemp(prefix="ipsw-bench-"))
    lab = Lab(LabSpec.from_flags(name=f"bench{int(time.time()) % 10000}", sites=2, nat="none"))
    started: list[System] = []
    results = {n: Result(n) for n in systems}
    try:
        with console.status("building a two-host lab ..."):
            lab.up()
        a, b = "s1h1", "s2h1"
        for name in systems:
            with console.status(f"starting {name} ..."):
                s = registry[name](name, lab, a, b, workdir / name)
                t0 = time.monotonic()
                s.start()
                started.append(s)
                if getattr(s, "guests", None) is not None:      # ours, guest to guest too
                    started.append(s.guests)
                    results[s.guests.name] = Result(s.guests.name)
                if name not in ("underlay",):
                    results[name].extra["setup_s"] = round(time.monotonic() - t0, 2)
        total = runs * 2 * len(started)
        done = 0
        for r in range(runs):
            for streams in (1, 4):
                for s in started:
                    done += 1
                    ha, hb = getattr(s, "hosts", (a, b))
                    with console.status(f"[{done}/{total}] round {r + 1}: {s.name}, TCP {streams} stream(s), {seconds:.0f} s"):
                        t = iperf3(lab, ha, hb, s.addr_b, streams=streams, seconds=seconds, pids_a=s.pids_a, pids_b=s.pids_b)
                    res = results[s.name]
                    (res.tcp1 if streams == 1 else res.tcp4).append(t.mbit)
                    if s.pids_a or s.pids_b:
                        res.cpu.append((t.cpu_a + t.cpu_b) / seconds)
        for s in started:
            res = results[s.name]
            with console.status(f"ping {s.name} ..."):
                res.ping_ms = ping_rtt(lab, getattr(s, "hosts", (a, b))[0], s.addr_b)
            if getattr(s, "light", False):
                continue
            if s.pids_a:
                res.rss_mb = round(rss_mb(s.pids_a), 1)
            with console.status(f"{s.name}: TCP during an unthrottled UDP flood ({seconds:.0f} s) ..."):
                fl = tcp_under_udp_flood(lab, a, b, s.addr_b, seconds=seconds)
            res.extra["tcp1_under_flood_mbit"] = fl["tcp_mbit"]
            if res.tcp1 and fl["tcp_mbit"] is not None:
                res.extra["flood_keeps_pct"] = round(100 * fl["tcp_mbit"] / statistics.median(res.tcp1))
            if hasattr(s, "group"):   # ours: the link must have stayed up
                peer = s.group.status(a)["overlays"][0]["peers"][0]
                res.extra["up_after_flood"] = peer["state"] == "up" and peer.get("ups", 1) == 1
            udp = s.outer_udp_ok()
            if udp is not None:
                res.extra["outer_udp"] = udp
            res.extra.update(s.extra_results(lab) if hasattr(s, "extra_results") else {})
        if "ipop-switch" in results and variants:
            from .systems import variant_throughput
            for kind in variants:
                with console.status(f"ipop-switch over a {kind} path ({seconds:.0f} s) ..."):
                    v = variant_throughput(kind, seconds=seconds, workdir=workdir)
                results["ipop-switch"].extra[f"tcp1_{kind}_mbit"] = v["mbit"]
                if kind == "relay":
                    results["ipop-switch"].extra["relay_setup_s"] = v["setup_s"]
                    results["ipop-switch"].extra["relay_path"] = v["path"]
    finally:
        for s in started:
            try:
                s.stop()
            except Exception as e:  # keep tearing down the rest
                console.print(f"[red]stopping {s.name}: {e}[/]")
        with console.status("tearing the lab down ..."):
            lab.down()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"runs": runs, "seconds": seconds, "results": {n: r.summary() for n, r in results.items()}}


def print_table(report: dict, console: Console) -> None:
    res = report["results"]
    peers = [n for n in res if n not in ("underlay", "ipop-switch")]
    t = Table(title=f"TCP throughput (Mbit/s, {report['runs']} runs of {report['seconds']:.0f} s: median [min-max]), "
                    "ping RTT, CPU (cores busy, both ends)")
    for col in ("system", "TCP 1 stream", "TCP 4 streams", "ping ms", "CPU", "RSS MB", "notes"):
        t.add_column(col)

    def cell(m):
        return f"{m['median']:.0f} [{m['min']:.0f}-{m['max']:.0f}]" if m else "-"
    for name, r in res.items():
        notes = []
        if "outer_udp" in r:
            notes.append("outer UDP ok" if r["outer_udp"] else "NOT in outer UDP")
        if "setup_s" in r:
            notes.append(f"setup {r['setup_s']} s")
        for k, v in r.items():
            if k not in ("tcp1_mbit", "tcp4_mbit", "cpu_per_s", "ping_ms", "rss_mb", "outer_udp", "setup_s"):
                notes.append(f"{k} {v}")
        t.add_row(name, cell(r["tcp1_mbit"]), cell(r["tcp4_mbit"]),
                  f"{r['ping_ms']:.3f}" if r["ping_ms"] else "-",
                  f"{r['cpu_per_s']:.2f}" if r["cpu_per_s"] is not None else "-",
                  f"{r['rss_mb']}" if r["rss_mb"] else "-", ", ".join(notes))
    console.print(t)
    g = res.get("ipop-switch guest-to-guest")
    if g and g["tcp1_mbit"] and res["ipop-switch"]["tcp1_mbit"]:
        for key, label in (("tcp1_mbit", "1 stream"), ("tcp4_mbit", "4 streams")):
            ratio = g[key]["median"] / res["ipop-switch"][key]["median"]
            console.print(f"ipop-switch guest-to-guest / host-to-host, TCP {label}: [bold]{ratio:.2f}[/]")
    peers = [n for n in peers if n != "ipop-switch guest-to-guest"]
    if "ipop-switch" in res and peers and res["ipop-switch"]["tcp1_mbit"]:
        for key, label in (("tcp1_mbit", "1 stream"), ("tcp4_mbit", "4 streams")):
            best = max(peers, key=lambda p: res[p][key]["median"] if res[p][key] else 0)
            if res[best][key] and res[best][key]["median"]:
                ratio = res["ipop-switch"][key]["median"] / res[best][key]["median"]
                console.print(f"ipop-switch / best peer ({best}), TCP {label}: [bold]{ratio:.2f}x[/]")
