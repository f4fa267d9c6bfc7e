"""``ipop-switch bench --soak MINUTES``: does a GroupVPN stay flat when left running? Leaks show
only with time, rekeys and link churn, so the soak runs every link at once for minutes to hours:

- 8 public lab hosts, each running ``ipop-switch up`` in one overlay (28 links, direct paths,
  no TURN: a cut is then a real outage, not a quiet move to the relay);
- traffic on every link the whole time: one ``ping -i 0.5`` per pair of nodes over the overlay
  (the echo crosses the link one way, the reply the other), logged with timestamps;
- a rekey every minute: the agents run with ``IPSW_LINK_TIMERS`` rekey_after 60 s, reject_after
  90 s (defaults 120/180 s, docs/tunnel.md);
- a link cut every ``cut_every`` (3 min; runs under two intervals get one, in the middle):
  nftables in one host drops UDP to and from one other host for ``CUT_SECONDS``; once the rule
  is gone both ends must show the link up again within ``RECOVER_TIMEOUT``;
- a sample every ``SAMPLE_EVERY`` s (at least 12 per run): per node RSS, PSS and open fds over
  the agent and every process it started, the bridge's OpenFlow flows (``ovs-ofctl`` on the
  node's private OVS), links up, session ages (a reset is a rekey) and drop counters.

Verdict (``report["ok"]``), all against the sample after warm-up (the first sample at or after
20 % of the run outside a cut: 1 min or more in runs of 5 min or more) and the last sample:
- RSS summed over all nodes grows by at most 5 % in runs of 30 min or more; shorter runs report
  the figure against 10 %, because first-time allocations (the first rekey, the first link
  re-made after a cut, pymalloc arenas filling) still dominate growth over a few minutes;
- no node's open fds grow (end - after warm-up <= 0): fds are per link and per process, and the
  end sample is taken with every link up, so any growth is a leak;
- no stuck link: no pair's pings go unanswered for more than ``STUCK_AFTER`` s outside its own
  cut (from the cut until it recovered), every link up at the end, no agent died;
- every cut recovered; no session older than rekey_after + ``REKEY_SLACK`` (rekeys happen).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .. import proc
from ..errors import IpopError
from ..lab import Lab, LabSpec, SiteSpec
from ..lab.nat import host_udp_drop_ruleset
from ..lab.nodes import LabGroup
from ..lab.probes import wait_links
from .memory import breakdown
from .systems import node_pids

OVERLAY, NET = "soak", 92
TIMERS_ENV = "IPSW_LINK_TIMERS"       # read by the agent (agent/overlay.py link_timers)
REKEY_AFTER, REJECT_AFTER = 60.0, 90.0
REKEY_SLACK = 20.0                    # a rekey may take retries; older than 80 s = not rekeying
CUT_EVERY = 180.0
CUT_SECONDS = 10.0
RECOVER_TIMEOUT = 30.0
SAMPLE_EVERY = 10.0
MIN_SAMPLES = 12
STUCK_AFTER = 10.0
LINKS_TIMEOUT = 150.0                 # 8 agents starting at once on 2 cores
PING_INTERVAL = 0.5
RSS_BOUND_LONG, RSS_BOUND_SHORT, LONG_RUN_MIN = 5.0, 10.0, 30.0
FD_TOLERANCE = 0
POLL = 0.5

_REPLY = re.compile(rb"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)")
_NOANSWER = re.compile(rb"^\[(\d+\.\d+)\] no answer yet for icmp_seq=(\d+)")


@dataclass
class PingLog:
    """One pair's ping stream, read incrementally from its log (``ping -D`` wall-clock stamps)."""
    a: str
    b: str
    path: Path
    proc: subprocess.Popen | None = None
    replies: list[float] = field(default_factory=list)
    sent: int = 0
    _pos: int = 0
    _rest: bytes = b""

    def read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except OSError:
            return
        self._pos += len(data)
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        for line in lines:
            m = _REPLY.match(line) or _NOANSWER.match(line)
            if m:
                self.sent = max(self.sent, int(m.group(2)))
                if m.re is _REPLY:
                    self.replies.append(float(m.group(1)))

    def count(self, since: float, until: float) -> int:
        return sum(since < t <= until for t in self.replies)


@dataclass
class Cut:
    a: str
    b: str
    at: float                         # seconds into the soak
    wall: float = 0.0
    removed_wall: float = 0.0
    down_after_s: float | None = None  # a's link to b seen not up, this long after the cut began
    recovered_s: float | None = None   # both ends up again, this long after the rule was removed

    def window(self) -> tuple[float, float]:
        """Wall-clock span in which this pair may be silent: the cut and its recovery."""
        end = self.removed_wall + (self.recovered_s if self.recovered_s is not None else RECOVER_TIMEOUT)
        return self.wall, end + 3 * PING_INTERVAL + 2.0   # the first replies after the link is back


def cut_plan(duration: float, every: float = CUT_EVERY) -> list[float]:
    """When cuts start (s into the soak): every ``every`` s while a cut and its recovery still
    fit before the end; runs shorter than two intervals get one cut, in the middle."""
    if duration < 2 * every:
        return [max(0.0, duration / 2 - CUT_SECONDS / 2)]
    out, t = [], every
    while t + CUT_SECONDS + RECOVER_TIMEOUT <= duration:
        out.append(t)
        t += every
    return out


def _sum_pct(a: float, b: float) -> float | None:
    return round((b - a) / a * 100, 2) if a else None


class Soak:
    """One soak run; ``run()`` returns the report. Every wait is bounded; ``run()`` always
    stops the pings, the agents and the lab."""

    def __init__(self, minutes: float, *, console: Console, nodes: int = 8, cut_every: float = CUT_EVERY) -> None:
        if nodes < 2:
            raise IpopError("a soak needs at least 2 nodes")
        self.duration = minutes * 60.0
        self.console = console
        self.n = nodes
        self.cut_every = cut_every
        self.every = min(SAMPLE_EVERY, self.duration / MIN_SAMPLES)
        self.lab = Lab(LabSpec(name=f"soak{int(time.time()) % 10000}",
                               sites=tuple(SiteSpec(f"k{i}", "none") for i in range(1, nodes + 1))))
        self.group: LabGroup | None = None
        self.hosts: list[str] = []
        self.pings: list[PingLog] = []
        self.samples: list[dict] = []
        self.cuts: list[Cut] = []
        self.ages: dict[str, tuple[float, float]] = {}   # "a-b" -> (sample time, session age)
        self.rekeys = 0
        self.max_age = 0.0
        self.died: list[str] = []
        self.names: dict[str, str] = {}                    # node id -> host
        self._prev_wall: float | None = None               # wall clock of the last sample

    # -- set-up ------------------------------------------------------------------------------
    def _start(self) -> float:
        self.lab.up()
        self.group = LabGroup(self.lab, OVERLAY, net=NET, extra={"no_turn": True, "worker_processes": 1})
        self.hosts = list(self.lab.hosts)
        for h in self.hosts:
            self.names[self.group.add(h).node_id] = h
        # the agents read their link timers from the environment they are started with
        old = os.environ.get(TIMERS_ENV)
        os.environ[TIMERS_ENV] = json.dumps({"rekey_after": REKEY_AFTER, "reject_after": REJECT_AFTER})
        try:
            for h in self.hosts:
                self.group.start(h)
        finally:
            if old is None:
                os.environ.pop(TIMERS_ENV, None)
            else:
                os.environ[TIMERS_ENV] = old
        took = wait_links(self.group, timeout=LINKS_TIMEOUT)
        if took is None:
            up = {h: self._links_up(h) for h in self.hosts}
            raise IpopError(f"not every link came up within {LINKS_TIMEOUT:.0f}s (links up per node: {up})")
        return took

    def _start_pings(self) -> None:
        logs = self.lab.dir / "soak"
        logs.mkdir(exist_ok=True)
        for i, a in enumerate(self.hosts):
            for b in self.hosts[i + 1:]:
                p = PingLog(a, b, logs / f"{a}-{b}.ping")
                with open(p.path, "wb") as out:
                    p.proc = self.lab.popen(a, ["ping", "-D", "-O", "-n", "-i", str(PING_INTERVAL), "-W", "2",
                                                self.group.nodes[b].ip], stdout=out, stderr=subprocess.STDOUT)
                self.pings.append(p)

    def _stop_pings(self) -> None:
        for p in self.pings:
            if p.proc and p.proc.poll() is None:
                p.proc.kill()
                try:
                    p.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass

    # -- looking at the nodes -----------------------------------------------------------------
    def _peers(self, host: str) -> list[dict]:
        try:
            return self.group.status(host)["overlays"][0]["peers"]
        except (IpopError, LookupError):
            return []

    def _links_up(self, host: str) -> int:
        return sum(p["state"] == "up" for p in self._peers(host))

    def _link_up(self, host: str, peer: str) -> bool:
        nid = self.group.nodes[peer].node_id
        return any(p["node_id"] == nid and p["state"] == "up" for p in self._peers(host))

    def _flows(self, host: str) -> int | None:
        """OpenFlow flows in the node's bridge, from its private OVS (mgmt socket in its run dir)."""
        rundir = self.group.nodes[host].dir / "state" / "ovs"
        try:
            out = proc.run(["ovs-ofctl", "-O", "OpenFlow13", "dump-flows", f"unix:{rundir}/ipsw{OVERLAY}.mgmt"],
                           timeout=10).stdout
        except IpopError:
            return None
        return sum("cookie=" in line for line in out.splitlines())

    def _sample(self, t: float, prev_wall: float | None) -> dict:
        wall = time.time()
        s: dict = {"t": round(t, 1), "rss_mb": 0.0, "pss_mb": 0.0, "fds": 0, "fds_by_node": {}, "rss_by_node": {},
                   "parts": {}, "flows": 0, "app_flows": 0, "links_up": 0, "drops": 0, "sig_drops": 0,
                   "in_cut": any(c.wall <= wall and (c.recovered_s is None or wall <= c.window()[1])
                                 for c in self.cuts)}
        for h in self.hosts:
            node = self.group.nodes[h]
            if node.proc is None or node.proc.poll() is not None:
                if h not in self.died:
                    self.died.append(h)
                continue
            try:
                st = self.group.status(h)["overlays"][0]
            except (IpopError, LookupError):
                st = {"peers": [], "switch": {}, "signaling": {}}
            for p in st["peers"]:
                s["links_up"] += p["state"] == "up"
                s["drops"] += sum((p.get("drops") or {}).values())
                peer = self.names.get(p["node_id"], p["node_id"])
                if h < peer:      # one end of each link: both see the same sessions
                    self._age(t, f"{h}-{peer}", p.get("last_handshake_s"))
            s["sig_drops"] += sum((st.get("signaling", {}).get("drops") or {}).values())
            s["app_flows"] += (st.get("switch") or {}).get("flows_active", 0)
            fl = self._flows(h)
            s["flows"] = None if fl is None or s["flows"] is None else s["flows"] + fl
            fds = 0
            for pid in node_pids(self.group, h):
                try:
                    fds += len(os.listdir(f"/proc/{pid}/fd"))
                except OSError:
                    pass
            parts = breakdown(self.group, h)
            rss = sum(v["rss_mb"] for v in parts.values())
            s["fds"] += fds
            s["fds_by_node"][h] = fds
            s["rss_by_node"][h] = round(rss, 1)
            s["rss_mb"] += rss
            s["pss_mb"] += sum(v["pss_mb"] for v in parts.values())
            for k, v in parts.items():
                s["parts"][k] = round(s["parts"].get(k, 0.0) + v["rss_mb"], 1)
        s["rss_mb"], s["pss_mb"] = round(s["rss_mb"], 1), round(s["pss_mb"], 1)
        for p in self.pings:
            p.read()
        if prev_wall is not None:
            counts = {f"{p.a}-{p.b}": p.count(prev_wall, wall) for p in self.pings}
            s["replies"] = sum(counts.values())
            s["silent_pairs"] = sorted(k for k, v in counts.items() if v == 0)
        s["rekeys"] = self.rekeys
        self.samples.append(s)
        return s

    def _age(self, t: float, key: str, age: float | None) -> None:
        """Session age of one link; a reset since the last sample is a new session (a rekey, or
        the link re-made after a cut)."""
        if age is None:
            return
        self.max_age = max(self.max_age, age)
        prev = self.ages.get(key)
        if prev and age < prev[1] + (t - prev[0]) - 2.0:
            self.rekeys += 1
        self.ages[key] = (t, age)

    # -- the cut ------------------------------------------------------------------------------
    def _cut(self, c: Cut, t0: float) -> None:
        """Cut a <-> b for CUT_SECONDS, then wait (bounded) for both ends to show the link up."""
        ns, table = self.lab.netns_of(c.a), "soakcut"
        c.wall = time.time()
        start = time.monotonic()
        proc.run(["nft", "-f", "-"], netns=ns, input=host_udp_drop_ruleset(table, self.lab.host(c.b).public_ip))
        try:
            while time.monotonic() - start < CUT_SECONDS:
                if c.down_after_s is None and not self._link_up(c.a, c.b):
                    c.down_after_s = round(time.monotonic() - start, 1)
                self._maybe_sample(t0)
                time.sleep(POLL)
        finally:
            proc.run(["nft", "delete", "table", "inet", table], netns=ns, check=False)
        c.removed_wall = time.time()
        removed = time.monotonic()
        while time.monotonic() - removed < RECOVER_TIMEOUT:
            if self._link_up(c.a, c.b) and self._link_up(c.b, c.a):
                c.recovered_s = round(time.monotonic() - removed, 1)
                break
            self._maybe_sample(t0)
            time.sleep(POLL)

    # -- the run ------------------------------------------------------------------------------
    def _maybe_sample(self, t0: float) -> None:
        t = time.monotonic() - t0
        if t >= len(self.samples) * self.every - 0.01 and t < self.duration:
            prev = self._prev_wall
            self._prev_wall = time.time()
            s = self._sample(t, prev)
            self.console.log(f"soak {s['t']:.0f}/{self.duration:.0f}s: RSS {s['rss_mb']:.0f} MB, fds {s['fds']}, "
                             f"flows {s['flows']}, links up {s['links_up']}/{self.n * (self.n - 1)}"
                             + (f", silent pairs {len(s['silent_pairs'])}" if s.get("silent_pairs") else ""))

    def run(self) -> dict:
        report: dict = {"minutes": self.duration / 60, "nodes": self.n, "links": self.n * (self.n - 1) // 2,
                        "lab": self.lab.spec.name, "timers": {"rekey_after": REKEY_AFTER, "reject_after": REJECT_AFTER},
                        "sample_every_s": round(self.every, 1), "cut_seconds": CUT_SECONDS}
        try:
            with self.console.status(f"building a lab of {self.n} hosts and starting their agents ..."):
                report["links_up_s"] = round(self._start(), 1)
            self._start_pings()
            plan = [Cut(*self._pair(i), at=at) for i, at in enumerate(cut_plan(self.duration, self.cut_every))]
            t0 = time.monotonic()
            traffic_wall = time.time()
            while time.monotonic() - t0 < self.duration:
                if plan and time.monotonic() - t0 >= plan[0].at:
                    c = plan.pop(0)
                    self.cuts.append(c)
                    self.console.log(f"soak: cutting {c.a} <-> {c.b} for {CUT_SECONDS:.0f}s")
                    self._cut(c, t0)
                    self.console.log(f"soak: {c.a} <-> {c.b} down after {c.down_after_s}s, "
                                     f"recovered {c.recovered_s}s after the cut ended")
                    continue
                self._maybe_sample(t0)
                time.sleep(POLL)
            # the end: every link up (bounded), then the last sample
            deadline = time.monotonic() + RECOVER_TIMEOUT
            while time.monotonic() < deadline and not all(self._links_up(h) == self.n - 1 for h in self.hosts):
                time.sleep(POLL)
            end_wall = time.time()
            self._sample(time.monotonic() - t0, self._prev_wall)
            report.update(self._verdict(traffic_wall, end_wall))
        finally:
            with self.console.status("stopping the pings, the nodes and the lab ..."):
                self._stop_pings()
                if self.group:
                    self.group.stop_all()
                self.lab.down()
        return report

    def _pair(self, i: int) -> tuple[str, str]:
        """The i-th cut's pair: stepping by 11 through the pairs (with 8 nodes, 28 pairs) spreads
        the cuts over different hosts and reaches every pair before repeating one."""
        pairs = [(a, b) for j, a in enumerate(self.hosts) for b in self.hosts[j + 1:]]
        step = 11 if math.gcd(11, len(pairs)) == 1 else 1
        return pairs[(i * step) % len(pairs)]

    # -- verdict ------------------------------------------------------------------------------
    def _stuck(self, start: float, end: float) -> list[dict]:
        """Pairs whose pings went unanswered for more than STUCK_AFTER s outside their own cut."""
        out = []
        for p in self.pings:
            p.read()
            excused = [c.window() for c in self.cuts if {c.a, c.b} == {p.a, p.b}]
            marks = [start, *[t for t in p.replies if start <= t <= end], end]
            for g0, g1 in zip(marks, marks[1:]):
                # the longest part of the gap outside the excused windows
                pieces, lo = [], g0
                for w0, w1 in sorted(excused):
                    if w1 <= lo or w0 >= g1:
                        continue
                    pieces.append(max(0.0, w0 - lo))
                    lo = max(lo, w1)
                pieces.append(max(0.0, g1 - lo))
                if max(pieces) > STUCK_AFTER:
                    out.append({"pair": f"{p.a}-{p.b}", "from_s": round(g0 - start, 1), "to_s": round(g1 - start, 1),
                                "silent_s": round(g1 - g0, 1)})
        return out

    def _verdict(self, start: float, end: float) -> dict:
        s = self.samples
        warm_t = 0.2 * self.duration
        warm = next((x for x in s if x["t"] >= warm_t and not x["in_cut"]), s[-1])
        first, last = s[0], s[-1]
        bound = RSS_BOUND_LONG if self.duration >= LONG_RUN_MIN * 60 else RSS_BOUND_SHORT
        rss_growth = _sum_pct(warm["rss_mb"], last["rss_mb"])
        fd_growth = max((last["fds_by_node"].get(h, 0) - warm["fds_by_node"].get(h, 0) for h in self.hosts), default=0)
        stuck = self._stuck(start, end)
        want = self.n * (self.n - 1)
        if last["links_up"] < want:
            for h in self.hosts:
                for peer in self.hosts:
                    if peer != h and not self._link_up(h, peer):
                        stuck.append({"pair": f"{h}>{peer}", "reason": "not up at the end"})
        sent = sum(p.sent for p in self.pings)
        got = sum(len(p.replies) for p in self.pings)
        cuts = []
        for c in self.cuts:
            gap = self._pair_gap(c)
            cuts.append({"t": round(c.at, 1), "a": c.a, "b": c.b, "seconds": CUT_SECONDS, "down_after_s": c.down_after_s,
                         "recovered_s": c.recovered_s, "ping_gap_s": gap})
        failures = []
        if rss_growth is None or rss_growth > bound:
            failures.append(f"RSS grew {rss_growth} % after warm-up (bound {bound} %)")
        if fd_growth > FD_TOLERANCE:
            failures.append(f"open fds grew by {fd_growth} on a node after warm-up")
        if stuck:
            failures.append(f"{len(stuck)} stuck link(s)")
        if any(c["recovered_s"] is None for c in cuts):
            failures.append("a cut link did not recover within %.0fs" % RECOVER_TIMEOUT)
        if self.max_age > REKEY_AFTER + REKEY_SLACK:
            failures.append(f"a session reached {self.max_age:.0f}s: not rekeyed every {REKEY_AFTER:.0f}s")
        if self.died:
            failures.append(f"agents died: {', '.join(self.died)}")
        pick = ("rss_mb", "pss_mb", "fds", "flows", "app_flows", "parts", "t")
        return {
            "samples": s, "warmup_s": round(warm_t, 1),
            "rss_mb": {"start": first["rss_mb"], "warm": warm["rss_mb"], "end": last["rss_mb"]},
            "rss_growth_pct": rss_growth, "rss_bound_pct": bound,
            "fds": {"start": first["fds"], "warm": warm["fds"], "end": last["fds"]}, "fd_growth": fd_growth,
            "at": {k: {f: x[f] for f in pick} for k, x in (("start", first), ("warm", warm), ("end", last))},
            "cuts": cuts, "rekeys": self.rekeys, "max_session_age_s": round(self.max_age, 1),
            "pings": {"sent": sent, "received": got, "lost": max(0, sent - got)},
            "drops_end": last["drops"], "stuck": stuck, "agents_died": self.died,
            "failures": failures, "ok": not failures,
        }

    def _pair_gap(self, c: Cut) -> float | None:
        """Longest silence of the cut pair's pings around the cut (0 if traffic went round it)."""
        p = next((p for p in self.pings if {p.a, p.b} == {c.a, c.b}), None)
        if p is None:
            return None
        w0, w1 = c.window()
        ts = [t for t in p.replies if w0 - 5 <= t <= w1 + 5]
        return round(max((b - a for a, b in zip(ts, ts[1:])), default=w1 - w0), 1)


def run_soak(minutes: float, *, console: Console, nodes: int = 8, cut_every: float = CUT_EVERY) -> dict:
    """Run a soak of ``minutes`` (after every link is up) and return its JSON-able report."""
    return Soak(minutes, console=console, nodes=nodes, cut_every=cut_every).run()


def print_soak(report: dict, console: Console) -> None:
    t = Table(title=f"soak: {report['nodes']} nodes, {report['links']} links, {report['minutes']:g} min "
                    f"(rekey every {report['timers']['rekey_after']:.0f}s, a {report['cut_seconds']:.0f}s cut "
                    f"every few minutes)")
    for col in ("t s", "RSS MB", "PSS MB", "fds", "flows", "links up", "rekeys", "drops", "pings answered", "silent pairs"):
        t.add_column(col, justify="right")
    want = report["nodes"] * (report["nodes"] - 1)
    for s in report.get("samples", []):
        t.add_row(f"{s['t']:.0f}" + (" (cut)" if s["in_cut"] else ""), f"{s['rss_mb']:.1f}", f"{s['pss_mb']:.1f}",
                  str(s["fds"]), str(s["flows"]), f"{s['links_up']}/{want}", str(s["rekeys"]), str(s["drops"]),
                  str(s.get("replies", "-")), str(len(s.get("silent_pairs", []))) if "silent_pairs" in s else "-")
    console.print(t)
    if "rss_mb" not in report:
        console.print("[red]the soak did not get to its verdict[/red]")
        return
    r, f = report["rss_mb"], report["fds"]
    console.print(f"RSS (all nodes): start {r['start']} MB, after warm-up ({report['warmup_s']:.0f}s) {r['warm']} MB, "
                  f"end {r['end']} MB: {report['rss_growth_pct']:+} % (bound {report['rss_bound_pct']} %)")
    parts = report["at"]
    console.print("  by part, warm -> end: " + ", ".join(
        f"{k} {parts['warm']['parts'].get(k, 0)} -> {v}" for k, v in sorted(parts["end"]["parts"].items())))
    console.print(f"open fds (all nodes): start {f['start']}, after warm-up {f['warm']}, end {f['end']}; "
                  f"largest growth on one node {report['fd_growth']:+d}")
    console.print(f"flows: start {parts['start']['flows']}, after warm-up {parts['warm']['flows']}, "
                  f"end {parts['end']['flows']}")
    console.print(f"rekeys seen {report['rekeys']}, oldest session {report['max_session_age_s']}s; pings "
                  f"{report['pings']['received']}/{report['pings']['sent']} answered")
    for c in report["cuts"]:
        console.print(f"cut at {c['t']:.0f}s {c['a']} <-> {c['b']} for {c['seconds']:.0f}s: link down after "
                      f"{c['down_after_s']}s, up again {c['recovered_s']}s after the cut ended, longest ping gap "
                      f"{c['ping_gap_s']}s")
    for s in report["stuck"]:
        console.print(f"[red]stuck: {s}[/red]")
    if report["ok"]:
        console.print("[green]soak ok[/green]")
    else:
        console.print("[red]soak failed: " + "; ".join(report["failures"]) + "[/red]")
