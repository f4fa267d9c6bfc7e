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
from ..errors import IpopError
from ..lab import Lab, LabSpec
from .measure import iperf3, ping_rtt, rss_mb, tcp_under_udp_flood
from .peer_n2n import N2nEdge
from .peer_nebula import Nebula
from .peer_openvpn import OpenVpnTap
from .peers import System, TincSwitch, Underlay, WireguardGo, stop_all
from .social import social_line, social_vs_group

PEERS: dict[str, type[System]] = {"underlay": Underlay, "wireguard-go": WireguardGo, "tinc": TincSwitch,
                                  "nebula": Nebula, "openvpn": OpenVpnTap, "n2n": N2nEdge}
PING_SLICES = 6      # per round and system: 10 pings at 20 ms each, the systems' order alternating
NOT_PEERS = ("underlay", "ipop-switch", "ipop-switch guest-to-guest", "ipop-switch social")   # not in the "best peer"


def ensure_packages(console: Console, systems: list[str], registry: dict[str, type[System]]) -> dict[str, str]:
    """Install the Debian packages of the systems to measure when missing (the bench runs as
    root); a peer that is not measured is not installed. Returns the systems to skip, with why:
    a package that cannot be installed here skips its peer with a note, it fails nothing."""
    needs = {s: tuple(registry[s].NEEDS) for s in systems if s in registry}
    missing = sorted({pkg for s in needs for b, pkg in needs[s] if not shutil.which(b)})
    if not shutil.which("iperf3"):
        missing = ["iperf3", *missing]
    if missing:
        console.print(f"installing {', '.join(missing)} ...")
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        for pkg in missing:        # one by one: a package this system lacks must not stop the others
            r = proc.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", pkg], env=env,
                         timeout=600, check=False)
            if r.returncode != 0:
                console.print(f"[yellow]could not install {pkg}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}[/]")
    proc.require("iperf3", "iperf3")
    skip = {}
    for s, bins in needs.items():
        absent = [f"{b} (package {pkg})" for b, pkg in bins if not shutil.which(b)]
        if absent:
            skip[s] = f"not installed: {', '.join(absent)}"
    return skip


@dataclass
class Result:
    name: str
    tcp1: list[float] = field(default_factory=list)
    tcp4: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)    # CPU seconds (both sides) per second of transfer
    ping_ms: float | None = None
    pings: list[float] = field(default_factory=list)   # average RTT of each slice of 10 pings
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
              variants: tuple[str, ...] = ("relay", "loss1"), guests: bool = True, flood: bool = True) -> dict:
    """``guests``: ipop-switch guest-to-guest measured too; ``flood``: TCP under a UDP flood,
    RSS and each system's extras after the rounds (off: a quick comparison, e.g. bench --social)."""
    proc.require_root()
    registry = {**PEERS, **(extra_systems or {})}
    unknown = [s for s in systems if s not in registry]
    if unknown:
        raise proc.IpopError(f"unknown system(s) {unknown}; known: {', '.join(registry)}")
    skipped = ensure_packages(console, systems, registry)
    for name, why in skipped.items():
        console.print(f"[yellow]skipping {name}: {why}[/]")
    systems = [s for s in systems if s not in skipped]
    workdir = Path(tempfile.mkdtemp(prefix="ipsw-bench-"))
    # a second host per site for the SocialVPN pair (bench/social.py says why not the same hosts)
    lab = Lab(LabSpec.from_flags(name=f"bench{int(time.time()) % 10000}", sites=2, nat="none",
                                 hosts=2 if "ipop-switch social" in systems else 1))
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
                try:
                    s.start()
                except IpopError as e:
                    if name in ("underlay", "ipop-switch", "ipop-switch social"):
                        raise
                    # a peer that does not come up here is a note, not the end of the run
                    s.stop()
                    skipped[name] = f"did not start: {e}"
                    console.print(f"[yellow]skipping {name}: {e}[/]")
                    del results[name]
                    continue
                started.append(s)
                if guests and getattr(s, "guests", None) is not None:      # ours, guest to guest too
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
                        t = iperf3(lab, ha, hb, s.addr_b, streams=streams, seconds=seconds, pids_a=s.pids_a, pids_b=s.pids_b,
                                   bind_b=getattr(s, "bind_b", None))
                    res = results[s.name]
                    (res.tcp1 if streams == 1 else res.tcp4).append(t.mbit)
                    if s.pids_a or s.pids_b:
                        res.cpu.append((t.cpu_a + t.cpu_b) / seconds)
            # RTT in every round too, in short slices whose order alternates (ABBA): the machine
            # drifts within seconds, and the system pinged right after the TCP runs is not favoured
            for k in range(PING_SLICES):
                for s in (started if k % 2 == 0 else started[::-1]):
                    with console.status(f"round {r + 1}: ping {s.name} ..."):
                        rtt = ping_rtt(lab, getattr(s, "hosts", (a, b))[0], s.addr_b, count=10, interval=0.02)
                    if rtt is not None:
                        results[s.name].pings.append(rtt)
        for s in started:
            res = results[s.name]
            res.ping_ms = round(statistics.median(res.pings), 3) if res.pings else None
            if getattr(s, "light", False) or not flood:
                if hasattr(s, "extra_results") and not getattr(s, "light", False):
                    res.extra.update(s.extra_results(lab))
                continue
            if s.pids_a:
                res.rss_mb = round(rss_mb(s.pids_a), 1)
            with console.status(f"{s.name}: TCP during an unthrottled UDP flood ({seconds:.0f} s) ..."):
                fl = tcp_under_udp_flood(lab, *getattr(s, "hosts", (a, b)), s.addr_b, seconds=seconds,
                                         bind_b=getattr(s, "bind_b", None))
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
                    ex = results["ipop-switch"].extra
                    ex["relay_setup_s"] = v["setup_s"]
                    ex["relay_path"] = v["path"]
                    ex.update(relay_figures(v))
                    if "first" in v:        # coturn scheduled first, as on a machine of its own
                        ex.update(relay_figures(v["first"], "_first"))
                    elif "first_error" in v:
                        ex["coturn_first_error"] = v["first_error"]
    finally:
        stop_all(started, console)
        with console.status("tearing the lab down ..."):
            lab.down()
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {n: r.summary() for n, r in results.items()}
    report = {"runs": runs, "seconds": seconds, "results": summary, "skipped": skipped, "vs_best_peer": ratios(summary)}
    cmp = social_vs_group(summary)
    if cmp:
        report["social_vs_group"] = cmp
    return report


def relay_figures(v: dict, first: str = "") -> dict:
    """Ours over TURN each way, coturn's own limit each way and our fraction of it; keys with
    ``first`` ("_first": coturn scheduled first) after ``relay`` / ``coturn``."""
    out = {f"tcp1_relay{first}_mbit": v["mbit"], f"tcp1_relay{first}_reverse_mbit": v.get("mbit_reverse")}
    for way, lim, ours in (("", "limit_mbit", "mbit"), ("_reverse", "limit_reverse_mbit", "mbit_reverse")):
        if v.get(lim):
            out[f"coturn{first}_limit{way}_mbit"] = v[lim]
            out[f"coturn{first}_fraction{way}"] = round(v[ours] / v[lim], 2)
    if "limit_error" in v:
        out[f"coturn{first}_limit_error"] = v["limit_error"]
    return out


def print_table(report: dict, console: Console) -> None:
    res = report["results"]
    t = Table(title=f"TCP throughput (Mbit/s, {report['runs']} runs of {report['seconds']:.0f} s: median \\[min-max]), "
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
    ours = res.get("ipop-switch") or {}
    for first, how in (("", ""), ("_first", " (coturn scheduled first, as on a machine of its own)")):
        if ours.get(f"coturn{first}_limit_mbit"):
            console.print(
                f"ipop-switch over TURN{how}: {ours[f'tcp1_relay{first}_mbit']:.0f} Mbit/s = "
                f"[bold]{ours[f'coturn{first}_fraction']:.2f}[/] of what coturn itself relays that way here "
                f"({ours[f'coturn{first}_limit_mbit']:.0f}); the other way "
                f"{ours.get(f'tcp1_relay{first}_reverse_mbit') or 0:.0f} = "
                f"{ours.get(f'coturn{first}_fraction_reverse', 0):.2f} of "
                f"{ours.get(f'coturn{first}_limit_reverse_mbit') or 0:.0f}")
    for name, why in report.get("skipped", {}).items():
        console.print(f"[yellow]{name} skipped: {why}[/]")
    for line in ratio_lines(res):
        console.print(line)
    line = social_line(report.get("social_vs_group"))
    if line:
        console.print(line)


def ratios(res: dict) -> dict:
    """ipop-switch against the best of all measured peers (highest median throughput, lowest
    RTT) and against each peer: {metric: {"best": name, "ratio": x, "each": {peer: x}}}.
    Empty without ipop-switch or without a peer."""
    ours = res.get("ipop-switch")
    peers = [n for n in res if n not in NOT_PEERS]
    out: dict = {}
    if not ours or not peers:
        return out
    for key in ("tcp1_mbit", "tcp4_mbit"):
        have = [p for p in peers if res[p][key] and res[p][key]["median"]]
        if ours[key] and have:
            each = {p: round(ours[key]["median"] / res[p][key]["median"], 2) for p in have}
            best = max(have, key=lambda p: res[p][key]["median"])
            out[key] = {"best": best, "ratio": each[best], "each": each}
    have = [p for p in peers if res[p]["ping_ms"]]
    if ours["ping_ms"] and have:
        each = {p: round(ours["ping_ms"] / res[p]["ping_ms"], 2) for p in have}
        best = min(have, key=lambda p: res[p]["ping_ms"])
        out["ping_ms"] = {"best": best, "ratio": each[best], "each": each}
    return out


def ratio_lines(res: dict) -> list[str]:
    labels = {"tcp1_mbit": "TCP 1 stream", "tcp4_mbit": "TCP 4 streams", "ping_ms": "ping RTT (lower is better)"}
    lines = []
    for key, r in ratios(res).items():
        each = ", ".join(f"{p} {x:.2f}x" for p, x in r["each"].items())
        lines.append(f"ipop-switch / best peer ({r['best']}), {labels[key]}: [bold]{r['ratio']:.2f}x[/]  (each: {each})")
    return lines
