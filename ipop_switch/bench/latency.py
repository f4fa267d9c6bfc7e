"""``ipop-switch bench --latency``: where a ping's round trip goes, and the floor that is not ours.

Issue 21 item 3. One two-host lab (public sites, no NAT) holds, side by side:

- **ipop-switch** between the two hosts, as users run it (``systems.IpopSwitch``), and the
  best peer of the full bench's RTT column (n2n) for the ratio in the same run;
- **the OVS floor**: the path's OVS userspace crossings with no worker at all, in namespaces
  of their own: a plain veth (0 crossings); one private OVS (netdev datapath, as a node's)
  whose bridge's LOCAL port pings a namespace behind a veth port (2 crossings per round
  trip); two private OVS, one per namespace, each bridge's LOCAL port holding an address and
  the bridges joined by a veth pair (4 crossings: the overlay's count, its two workers
  replaced by a veth).

Every target is pinged ``count`` times (default 200) per round, rounds interleaved (the
machine drifts), and the **median** RTT is reported with p10/p90. Variants (``--variants``)
are applied to every running OVS and/or process between rounds, A/B interleaved with the
base: OVS ``other_config`` knobs (live) and CPU pinning. The stage-by-stage capture
(``capture``) runs tcpdump on the bridge LOCAL port, the tunnel TAP and the wire of both
hosts (one clock: one machine) and prints the median of each stage. The idle cost of the
ipop-switch node (``idle_cpu``) is its processes' on-CPU time over 30 s with the link up
and nothing flowing, read from ``/proc/PID/task/*/schedstat`` (nanoseconds, every thread).
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.console import Console

from .. import proc
from ..lab import Lab, LabSpec
from .peer_n2n import N2nEdge
from .peers import stop_all
from .systems import IpopSwitch, node_pids

FLOOR_NET = "100.66"            # the floor's subnets (100.64.0.0/10, apart from the lab's and the bench's)
CAPTURE_PINGS = 100
_TIME = re.compile(r"time=([\d.]+) ms")


# -- pings ------------------------------------------------------------------------------------

def ping_rtts(netns: str, addr: str, *, count: int, interval: float) -> list[float]:
    """Every answered ping's RTT in ms (``ping`` prints each; lost ones are absent)."""
    r = proc.run(["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", addr], netns=netns,
                 check=False, timeout=count * (interval + 0.01) + 30)
    return [float(m) for m in _TIME.findall(r.stdout)]


def spread(xs: list[float]) -> dict:
    """median, p10, p90 and the count of a list of RTTs (ms)."""
    if not xs:
        return {"median": None, "p10": None, "p90": None, "n": 0}
    s = sorted(xs)
    return {"median": round(statistics.median(s), 3), "p10": round(s[len(s) // 10], 3),
            "p90": round(s[(len(s) * 9) // 10], 3), "n": len(s)}


# -- the floor: OVS userspace crossings without a worker -------------------------------------

@dataclass
class Ovs:
    """A private OVS seen as a user does: started and stopped with ``ovs_scripts/ovs-private``'s
    module (a subprocess: bench does not import bridge/), changed with ``ovs-vsctl``."""

    rundir: Path
    netns: str | None = None

    @property
    def sock(self) -> Path:
        return self.rundir / "db.sock"

    def start(self) -> "Ovs":
        argv = [sys.executable, "-m", "ipop_switch.bridge.ovs", "start", str(self.rundir), "--datapath", "netdev"]
        proc.run(argv + (["--netns", self.netns] if self.netns else []), timeout=30)
        return self

    def stop(self) -> None:
        proc.run([sys.executable, "-m", "ipop_switch.bridge.ovs", "stop", str(self.rundir)], check=False, timeout=30)

    def vsctl(self, *args: str) -> str:
        return proc.run(["ovs-vsctl", f"--db=unix:{self.sock}", "--timeout=10", *args],
                        env={"OVS_RUNDIR": str(self.rundir)}, timeout=20).stdout

    def pids(self) -> list[int]:
        out = []
        for name in ("ovs-vswitchd", "ovsdb-server"):
            try:
                out.append(int((self.rundir / f"{name}.pid").read_text().strip()))
            except (OSError, ValueError):
                continue
        return out


@dataclass
class OvsFloor:
    """Namespaces and private OVS instances of the floor, inside ``lab`` (removed with it)."""

    lab: Lab
    workdir: Path
    ovs: list[Ovs] = field(default_factory=list)
    targets: dict[str, tuple[str, str]] = field(default_factory=dict)   # label -> (netns, addr)

    def start(self) -> None:
        ns = {w: self.lab.add_namespace(w) for w in ("f0a", "f0b", "f1a", "f1b", "f2a", "f2b")}
        veth = self.lab._ns.veth
        # 0 crossings: a veth pair
        veth(ns["f0a"], "v0", ns["f0b"], "v0")
        self._addr(ns["f0a"], "v0", f"{FLOOR_NET}.0.1/24")
        self._addr(ns["f0b"], "v0", f"{FLOOR_NET}.0.2/24")
        self.targets["veth only (0 OVS crossings)"] = (ns["f0a"], f"{FLOOR_NET}.0.2")
        # 2 crossings: f1a's bridge LOCAL <-> OVS <-> veth port <-> f1b's kernel
        o1 = self._ovs("f1a", ns["f1a"])
        self._bridge(o1, "brf1", ns["f1a"])
        veth(ns["f1a"], "p1", ns["f1b"], "q1")
        o1.vsctl("add-port", "brf1", "p1")
        self._addr(ns["f1a"], "brf1", f"{FLOOR_NET}.1.1/24")
        self._addr(ns["f1b"], "q1", f"{FLOOR_NET}.1.2/24")
        self.targets["one OVS (2 crossings)"] = (ns["f1a"], f"{FLOOR_NET}.1.2")
        # 4 crossings: LOCAL(A) <-> OVS A <-> veth <-> OVS B <-> LOCAL(B): the overlay without workers
        oa, ob = self._ovs("f2a", ns["f2a"]), self._ovs("f2b", ns["f2b"])
        self._bridge(oa, "brf2", ns["f2a"])
        self._bridge(ob, "brf2", ns["f2b"])
        veth(ns["f2a"], "p2", ns["f2b"], "p2")
        oa.vsctl("add-port", "brf2", "p2")
        ob.vsctl("add-port", "brf2", "p2")
        self._addr(ns["f2a"], "brf2", f"{FLOOR_NET}.2.1/24")
        self._addr(ns["f2b"], "brf2", f"{FLOOR_NET}.2.2/24")
        self.targets["two OVS (4 crossings)"] = (ns["f2a"], f"{FLOOR_NET}.2.2")
        for label, (n, addr) in self.targets.items():
            proc.wait_for(lambda: proc.run(["ping", "-c", "1", "-W", "1", addr], netns=n, check=False).returncode == 0,
                          timeout=20, what=f"the floor's {label} to answer")

    def _ovs(self, what: str, netns: str) -> Ovs:
        inst = Ovs(self.workdir / f"ovs-{what}", netns)
        self.ovs.append(inst)
        return inst.start()

    @staticmethod
    def _bridge(o: Ovs, name: str, netns: str) -> None:
        """A learning bridge (no controller) on the userspace datapath, as a node's is."""
        o.vsctl("add-br", name, "--", "set", "bridge", name, "datapath_type=netdev", "fail_mode=standalone")
        proc.wait_for(lambda: proc.run(["ip", "link", "show", name], netns=netns, check=False).returncode == 0,
                      timeout=10, what=f"OVS's LOCAL port {name}")

    @staticmethod
    def _addr(netns: str, dev: str, cidr: str) -> None:
        proc.run(["ip", "-n", netns, "addr", "add", cidr, "dev", dev])
        proc.run(["ip", "-n", netns, "link", "set", dev, "up"])

    def pids(self) -> list[int]:
        return [p for o in self.ovs for p in o.pids()]

    def stop(self) -> None:
        for o in self.ovs:
            o.stop()
        self.ovs.clear()


# -- the stage-by-stage capture ----------------------------------------------------------------

def _ifaces(lab: Lab, host: str, overlay_ip: str) -> dict[str, str]:
    """The host's wire (the interface with its public address), bridge LOCAL port (the one with
    the overlay address) and tunnel TAP (``agent/overlay.py``'s ``ipt`` names)."""
    out = proc.run(["ip", "-o", "link"], netns=lab.netns_of(host)).stdout
    names = [l.split(":")[1].strip().split("@")[0] for l in out.splitlines()]
    addrs = proc.run(["ip", "-o", "-4", "addr"], netns=lab.netns_of(host)).stdout
    wire = next(l.split()[1] for l in addrs.splitlines() if f" {lab.host(host).lan_ip}/" in l)
    bridge = next(l.split()[1] for l in addrs.splitlines() if f" {overlay_ip}/" in l)
    tap = next(n for n in names if n.startswith("ipt"))
    return {"wire": wire, "bridge": bridge, "tap": tap}


def _read(pcap: Path) -> list[tuple[float, str]]:
    r = proc.run(["tcpdump", "-n", "-tt", "--time-stamp-precision=nano", "-r", str(pcap)], check=False, timeout=60)
    rows = []
    for line in r.stdout.splitlines():
        ts, _, rest = line.partition(" ")
        try:
            rows.append((float(ts), rest))
        except ValueError:
            continue
    return rows


def _icmp(rows: list[tuple[float, str]], kind: str) -> dict[int, float]:
    """seq -> first time an ICMP echo ``kind`` ('request'/'reply') was seen."""
    out: dict[int, float] = {}
    for t, rest in rows:
        m = re.search(rf"ICMP echo {kind}, id \d+, seq (\d+)", rest)
        if m and int(m.group(1)) not in out:
            out[int(m.group(1))] = t
    return out


def _udp(rows: list[tuple[float, str]], src: str) -> list[float]:
    return [t for t, rest in rows if rest.startswith(f"IP {src}.") and "UDP" in rest]


def _after(times: list[float], t: float, within: float = 0.01) -> float | None:
    """The first time in ``times`` after ``t`` (within ``within`` s)."""
    for x in times:
        if t < x < t + within:
            return x
    return None


STAGES = ("A: kernel -> OVS -> tunnel TAP", "A: TAP read -> seal -> UDP out (worker)", "wire A -> B",
          "B: UDP in -> open -> TAP write (worker)", "B: TAP -> OVS -> LOCAL port", "B: kernel answers",
          "B: kernel -> OVS -> tunnel TAP", "B: TAP read -> seal -> UDP out (worker)", "wire B -> A",
          "A: UDP in -> open -> TAP write (worker)", "A: TAP -> OVS -> LOCAL port")


def capture(lab: Lab, a: str, b: str, addr_a: str, addr_b: str, workdir: Path, *, count: int = CAPTURE_PINGS,
            interval: float = 0.05) -> dict:
    """tcpdump on the LOCAL port, tunnel TAP and wire of both hosts while ``a`` pings ``addr_b``
    over the overlay; the median of each stage in microseconds, and the RTT ping saw."""
    ifs = {a: _ifaces(lab, a, addr_a), b: _ifaces(lab, b, addr_b)}
    caps: dict[tuple[str, str], tuple[subprocess.Popen, Path]] = {}
    for h in (a, b):
        for role, dev in ifs[h].items():
            pcap = workdir / f"cap-{h}-{role}.pcap"
            flt = "udp" if role == "wire" else "icmp"
            caps[(h, role)] = (lab.popen(h, ["tcpdump", "-U", "-n", "-i", dev, "-B", "4096", "-w", str(pcap),
                                             "--time-stamp-precision=nano", flt],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), pcap)
    try:
        proc.wait_for(lambda: all(p.exists() and p.stat().st_size >= 24 for _, p in caps.values()),
                      timeout=10, what="tcpdump on every interface")
        time.sleep(0.5)
        rtts = ping_rtts(lab.netns_of(a), addr_b, count=count, interval=interval)
        time.sleep(0.3)
    finally:
        for p, _ in caps.values():
            p.send_signal(signal.SIGINT)
        for p, _ in caps.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
    rows = {k: _read(pcap) for k, (_, pcap) in caps.items()}
    ip_a, ip_b = lab.host(a).lan_ip, lab.host(b).lan_ip
    req = {k: _icmp(rows[k], "request") for k in rows if k[1] != "wire"}
    rep = {k: _icmp(rows[k], "reply") for k in rows if k[1] != "wire"}
    out_a, out_b = _udp(rows[(a, "wire")], ip_a), _udp(rows[(b, "wire")], ip_b)
    in_b, in_a = _udp(rows[(b, "wire")], ip_a), _udp(rows[(a, "wire")], ip_b)
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    totals = []
    for seq, t0 in req[(a, "bridge")].items():
        t1 = req[(a, "tap")].get(seq)
        t4, t5 = req[(b, "tap")].get(seq), req[(b, "bridge")].get(seq)
        t6, t7 = rep[(b, "bridge")].get(seq), rep[(b, "tap")].get(seq)
        t10, t11 = rep[(a, "tap")].get(seq), rep[(a, "bridge")].get(seq)
        if None in (t1, t4, t5, t6, t7, t10, t11):
            continue
        t2, t3 = _after(out_a, t1), _after(in_b, t1)
        t8, t9 = _after(out_b, t7), _after(in_a, t7)
        ts = (t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11)
        if None in ts or list(ts) != sorted(ts):
            continue
        for name, (x, y) in zip(STAGES, zip(ts, ts[1:])):
            per_stage[name].append((y - x) * 1e6)
        totals.append((t11 - t0) * 1e6)
    return {"pings": len(rtts), "matched": len(totals), "rtt_ms": spread(rtts),
            "total_us_median": round(statistics.median(totals)) if totals else None,
            "stages_us_median": {s: round(statistics.median(v)) if v else None for s, v in per_stage.items()},
            "interfaces": ifs}


# -- idle cost -----------------------------------------------------------------------------------

def on_cpu_ns(pids: list[int]) -> int:
    """Time on CPU of every thread of ``pids`` (schedstat, ns)."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                total += int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


def idle_cpu(pids: list[int], seconds: float = 30.0) -> float:
    """% of one core the processes take over ``seconds`` while nothing flows."""
    c0, t0 = on_cpu_ns(pids), time.monotonic()
    time.sleep(seconds)
    return round(100 * (on_cpu_ns(pids) - c0) / 1e9 / (time.monotonic() - t0), 3)


# -- variants: what can be switched on and off between rounds ---------------------------------------

def _ovs_of(group, host: str) -> Ovs:
    """The running node's private OVS (its run directory holds db.sock)."""
    return Ovs(next(group.nodes[host].dir.rglob("db.sock")).parent)


def ovs_knobs(knobs: dict[str, str]) -> Callable[[list[Ovs]], Callable[[], None]]:
    """A variant that sets ``other_config`` keys on every OVS (live) and returns their undo."""
    def apply(instances: list[Ovs]) -> Callable[[], None]:
        before = {}
        for o in instances:
            before[o.rundir] = {k: o.vsctl("--if-exists", "get", "Open_vSwitch", ".", f"other_config:{k}").strip()
                                for k in knobs}
            o.vsctl("set", "Open_vSwitch", ".", *[f"other_config:{k}={v}" for k, v in knobs.items()])

        def undo() -> None:
            for o in instances:
                for k, v in before[o.rundir].items():
                    if v:
                        o.vsctl("set", "Open_vSwitch", ".", f"other_config:{k}={v}")
                    else:
                        o.vsctl("remove", "Open_vSwitch", ".", "other_config", k)
        return undo
    return apply


def _threads(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            out += [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
    return out


def pinned(cpus: set[int]) -> Callable[[list[int]], Callable[[], None]]:
    """A variant that pins every thread of the given processes to ``cpus``, and its undo."""
    def apply(pids: list[int]) -> Callable[[], None]:
        before = {}
        for t in _threads(pids):
            try:
                before[t] = os.sched_getaffinity(t)
                os.sched_setaffinity(t, cpus)
            except OSError:
                continue

        def undo() -> None:
            for t, c in before.items():
                try:
                    os.sched_setaffinity(t, c)
                except OSError:
                    continue
        return undo
    return apply


def sysctls(values: dict[str, str]) -> Callable[[], Callable[[], None]]:
    """A variant that sets machine-wide sysctls (run under the lab lock: nothing else measures)
    and returns their undo."""
    def apply() -> Callable[[], None]:
        before = {k: Path("/proc/sys", k.replace(".", "/")).read_text().strip() for k in values}
        for k, v in values.items():
            Path("/proc/sys", k.replace(".", "/")).write_text(v)

        def undo() -> None:
            for k, v in before.items():
                Path("/proc/sys", k.replace(".", "/")).write_text(v)
        return undo
    return apply


def no_idle_halt() -> Callable[[], None]:
    """Diagnosis, not a setting to ship: a PM QoS request of 0 us (``/dev/cpu_dma_latency``, held
    open) keeps every vCPU in the POLL idle state instead of halting, so a wake-up costs no VM
    exit. What it changes is the share of the round trip that is this VM waking its vCPUs."""
    fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
    os.write(fd, (0).to_bytes(4, "little"))
    return lambda: os.close(fd)


VARIANTS: dict[str, tuple[str, object]] = {
    "no-halt": ("sys", no_idle_halt),                 # diagnosis only
    # SO_BUSY_POLL's mechanism for every socket at once (busy_read: blocking reads; busy_poll:
    # poll/epoll, what uvloop and OVS wait in): spin on the socket's NAPI context before sleeping
    "busy-poll-50us": ("sys", sysctls({"net.core.busy_read": "50", "net.core.busy_poll": "50"})),
    # other_config of the userspace datapath that apply to non-PMD (TAP, veth, internal) ports
    "emc-always": ("ovs", ovs_knobs({"emc-insert-inv-prob": "1"})),       # kept: bridge/ovs.py sets it
    "emc-default": ("ovs", ovs_knobs({"emc-insert-inv-prob": "100"})),    # OVS's own default, to compare
    "smc": ("ovs", ovs_knobs({"smc-enable": "true"})),
    "threads-1": ("ovs", ovs_knobs({"n-handler-threads": "1", "n-revalidator-threads": "1"})),
    "max-idle-60s": ("ovs", ovs_knobs({"max-idle": "60000"})),
    # every process of the path (ipop-switch: both nodes; the floor: its OVS) on one CPU: a
    # woken process then runs on the vCPU that is already running, no halted vCPU to wake
    "one-cpu": ("pin", pinned({0})),
}


# -- the run ---------------------------------------------------------------------------------------

def run_latency(*, console: Console, count: int = 200, interval: float = 0.02, rounds: int = 2,
                variants: tuple[str, ...] = (), do_capture: bool = True, idle_seconds: float = 30.0,
                peers: bool = True) -> dict:
    proc.require_root()
    proc.require("tcpdump", "tcpdump")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise proc.IpopError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    workdir = Path(tempfile.mkdtemp(prefix="ipsw-lat-"))
    lab = Lab(LabSpec.from_flags(name=f"lat{int(time.time()) % 10000}", sites=2, nat="none"))
    a, b = "s1h1", "s2h1"
    systems: list = []
    floor = OvsFloor(lab, workdir / "floor")
    report: dict = {"count": count, "interval_s": interval, "rounds": rounds}
    try:
        with console.status("building a two-host lab ..."):
            lab.up()
        ours = IpopSwitch("ipop-switch", lab, a, b, workdir / "ipsw")
        with console.status("starting ipop-switch ..."):
            ours.start()
        systems.append(ours)
        targets: dict[str, tuple[str, str]] = {"ipop-switch": (lab.netns_of(a), ours.addr_b)}
        if peers:
            n2n = N2nEdge("n2n", lab, a, b, workdir / "n2n")
            try:
                with console.status("starting n2n ..."):
                    n2n.start()
                systems.append(n2n)
                targets["n2n"] = (lab.netns_of(a), n2n.addr_b)
            except proc.IpopError as e:
                n2n.stop()
                console.print(f"[yellow]n2n skipped: {e}[/]")
        with console.status("building the OVS floor ..."):
            floor.start()
        targets.update(floor.targets)
        ours_pids = node_pids(ours.group, a) + node_pids(ours.group, b)
        node_ovs = [_ovs_of(ours.group, h) for h in (a, b)]
        if do_capture:
            with console.status("stage-by-stage capture ..."):
                report["capture"] = capture(lab, a, b, ours.addr_a, ours.addr_b, workdir)
        if idle_seconds:
            with console.status(f"idle CPU of one ipop-switch node, {idle_seconds:.0f} s ..."):
                report["idle_cpu_pct_base"] = idle_cpu(node_pids(ours.group, a), idle_seconds)
        rtts: dict[str, dict[str, list[float]]] = {}
        medians: dict[str, dict[str, list[float]]] = {}     # per run: the A/B pairs, and the noise
        plan = ["base"] + [x for v in variants for x in (v, "base")]     # A/B interleaved
        for r in range(rounds):
            for variant in plan:
                undo = None
                if variant != "base":
                    kind, fn = VARIANTS[variant]
                    undo = (fn(node_ovs + floor.ovs) if kind == "ovs" else fn() if kind == "sys"
                            else fn(ours_pids + floor.pids()))
                    time.sleep(1.0)
                try:
                    for label, (ns, addr) in targets.items():
                        with console.status(f"round {r + 1}/{rounds}, {variant}: {label} ({count} pings)"):
                            got = ping_rtts(ns, addr, count=count, interval=interval)
                        rtts.setdefault(variant, {}).setdefault(label, []).extend(got)
                        medians.setdefault(variant, {}).setdefault(label, []).append(spread(got)["median"])
                    if idle_seconds and variant != "base" and r == 0:
                        with console.status(f"idle CPU with {variant}, {idle_seconds:.0f} s ..."):
                            report[f"idle_cpu_pct_{variant}"] = idle_cpu(node_pids(ours.group, a), idle_seconds)
                finally:
                    if undo:
                        undo()
                        time.sleep(1.0)
        report["rtt_ms"] = {v: {label: spread(xs) for label, xs in per.items()} for v, per in rtts.items()}
        report["run_medians"] = medians
        base = report["rtt_ms"]["base"]
        if base.get("n2n", {}).get("median") and base["ipop-switch"]["median"]:
            report["ratio_to_n2n"] = round(base["ipop-switch"]["median"] / base["n2n"]["median"], 2)
    finally:
        floor.stop()
        stop_all(systems, console)
        with console.status("tearing the lab down ..."):
            lab.down()
    return report


def print_latency(report: dict, console: Console) -> None:
    cap = report.get("capture")
    if cap:
        console.print(f"stage-by-stage ({cap['matched']} of {cap['pings']} pings matched; ping saw median "
                      f"{cap['rtt_ms']['median']} ms; the stages sum to {cap['total_us_median']} us median):")
        for s, us in cap["stages_us_median"].items():
            console.print(f"  {s:45s} {us if us is not None else '-':>6} us")
    for k, v in report.items():
        if k.startswith("idle_cpu_pct"):
            console.print(f"{k.replace('idle_cpu_pct_', 'idle CPU of one node, ')}: {v} % of a core")
    for variant, per in report.get("rtt_ms", {}).items():
        console.print(f"[bold]{variant}[/] (RTT ms, median \\[p10-p90] of n; each run's median):")
        for label, s in per.items():
            runs = " ".join(str(m) for m in report.get("run_medians", {}).get(variant, {}).get(label, []))
            console.print(f"  {label:32s} {s['median']} \\[{s['p10']}-{s['p90']}] n={s['n']}  ({runs})")
    if "ratio_to_n2n" in report:
        console.print(f"ipop-switch / n2n (base): [bold]{report['ratio_to_n2n']}x[/]")
