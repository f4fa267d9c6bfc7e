"""``ipop-switch bench --faults``: every single fault a link lives through, measured.

One lab, two real nodes (``ipop-switch up``): ``ah1`` behind a hard NAT (endpoint-dependent
mapping, as most carrier and office NATs), ``bh1`` on a public address. Each scenario runs
against a steady ping stream over the overlay (20 per second, ``ah1`` -> ``bh1``) while both
agents' status is polled ten times a second, and reports:

- **detect**: from the fault to the first status (of a node still running) that shows it:
  the link not up or gone down and up again, a changed local address, signaling offline;
- **recover**: until both nodes show the link up and signaling online again *and* the pings
  flow again, counted from the fault's end (the end of a cut or of a loss period), else from
  the fault;
- **lost**: pings sent after the fault began whose reply never came.

The scenarios run one after the other in the same lab (each waits for a healthy link
first); the order puts the TURN restart last, since it needs the direct path blocked.
``tests/test_faults_lab.py`` runs the same scenarios with bounds.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from .. import proc
from ..lab import Lab, LabSpec, SiteSpec
from ..lab.nat import core_port_loss_ruleset, host_udp_drop_ruleset as drop_udp
from ..lab.nodes import LabGroup
from .systems import node_pids

A, B = "ah1", "bh1"
PING_INTERVAL = 0.05
SAMPLE_INTERVAL = 0.1
BASELINE = 2.0          # healthy traffic before each fault
TAIL = 1.5              # and after recovery
READY_TIMEOUT = 90.0
RECOVER_TIMEOUT = 60.0
CUT_SECONDS = 20.0
LOSS_SECONDS = 10.0
ROAM_TO = "100.64.1.21"
_REPLY = re.compile(rb"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+) .*time=([\d.]+) ms")
_NO_ANSWER = re.compile(rb"^\[(\d+\.\d+)\] no answer yet for icmp_seq=(\d+)")


@dataclass
class Outcome:
    name: str
    detect_s: float | None        # None: no node saw anything
    recover_s: float | None       # None: not recovered within RECOVER_TIMEOUT
    lost: int
    sent: int
    link_went_down: bool
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def recovered(self) -> bool:
        return self.recover_s is not None


# -- the probes: a ping stream and a status sampler, both in background threads ------------

class PingStream:
    """``ping -D -O`` at 20/s in ``host``: per seq the time it was sent (a reply's receive time
    less its RTT; for an unanswered one, when ping gave up on it at the next send) and, if
    answered, when the reply came. ping slows down while nothing comes back, so send times
    are read, not computed from the seq."""

    def __init__(self, lab: Lab, host: str, addr: str) -> None:
        self.replies: dict[int, float] = {}
        self.sent: dict[int, float] = {}
        self.started = time.time()
        self._p = lab.popen(host, ["ping", "-D", "-O", "-n", "-i", str(PING_INTERVAL), "-W", "1", addr],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self._p.stdout is not None
        for line in self._p.stdout:
            m = _REPLY.match(line)
            if m:
                seq, t = int(m.group(2)), float(m.group(1))
                self.replies.setdefault(seq, t)
                self.sent.setdefault(seq, t - float(m.group(3)) / 1000)
                continue
            m = _NO_ANSWER.match(line)
            if m:
                self.sent.setdefault(int(m.group(2)), float(m.group(1)) - PING_INTERVAL)

    def sent_at(self, seq: int) -> float:
        """When ``seq`` was sent (unknown ones: between their known neighbours)."""
        if seq in self.sent:
            return self.sent[seq]
        later = [t for q, t in self.sent.items() if q > seq]
        return min(later) if later else self.started + (seq - 1) * PING_INTERVAL

    def stop(self) -> None:
        self._p.terminate()
        try:
            self._p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._p.kill()
            self._p.wait(timeout=5)
        self._t.join(timeout=5)

    def since(self, t: float) -> tuple[int, int, float | None]:
        """Pings sent after ``t`` (up to the last answered one): (sent, lost, time the first
        reply after the last lost one came)."""
        if not self.replies:
            return 0, 0, None
        last = max(self.replies)
        seqs = [s for s in range(1, last + 1) if self.sent_at(s) >= t]
        lost = [s for s in seqs if s not in self.replies]
        if not lost:
            return len(seqs), 0, None
        after = [self.replies[s] for s in range(max(lost) + 1, last + 1) if s in self.replies]
        return len(seqs), len(lost), (min(after) if after else None)


@dataclass
class View:
    """What one node's status said at one moment (None fields: no status)."""
    t: float
    ok: bool                 # status answered
    state: str | None = None
    ups: int | None = None
    local: str | None = None
    path: str | None = None
    signaling: str | None = None

    def healthy(self) -> bool:
        return self.ok and self.state == "up" and self.signaling == "online"


class Sampler:
    """Both nodes' status, ten times a second."""

    def __init__(self, group: LabGroup) -> None:
        self.group = group
        self.views: dict[str, list[View]] = {A: [], B: []}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for h in (A, B):
                self.views[h].append(view_of(self.group, h))
            self._stop.wait(SAMPLE_INTERVAL)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=10)

    def last(self, h: str) -> View | None:
        return self.views[h][-1] if self.views[h] else None


def view_of(group: LabGroup, host: str) -> View:
    t = time.time()
    try:
        ov = group.status(host)["overlays"][0]
    except Exception:
        return View(t, False)
    peers = ov.get("peers") or [{}]
    p = peers[0]
    return View(t, True, p.get("state"), p.get("ups"), p.get("local_addr"), p.get("path"),
                ov.get("signaling", {}).get("state"))


# -- the lab ----------------------------------------------------------------------------------

class FaultLab:
    """The two-node lab every scenario runs in."""

    def __init__(self, name: str | None = None) -> None:
        self.lab = Lab(LabSpec(name=name or f"flt{int(time.time()) % 100000}",
                               sites=(SiteSpec("a", "hard"), SiteSpec("b", "none"))))
        self.group: LabGroup | None = None

    def up(self) -> "FaultLab":
        self.lab.up()
        self.group = LabGroup(self.lab)
        for h in (A, B):
            self.group.add(h)
        for h in (A, B):
            self.group.start(h)
        return self

    def down(self) -> None:
        try:
            if self.group:
                self.group.stop_all()
        finally:
            self.lab.down()

    @property
    def addr_b(self) -> str:
        assert self.group
        return self.group.nodes[B].ip

    def nft(self, host: str, ruleset: str) -> None:
        proc.run(["nft", "-f", "-"], netns=self.lab.netns_of(host), input=ruleset)

    def nft_delete(self, host: str, table: str) -> None:
        proc.run(["nft", "delete", "table", "inet", table], netns=self.lab.netns_of(host), check=False)

    def wait_ready(self, *, path: str | None = None, timeout: float = READY_TIMEOUT) -> None:
        """Both links up (on ``path`` if given), signaling online, and a ping answered."""
        assert self.group
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            va, vb = view_of(self.group, A), view_of(self.group, B)
            if va.healthy() and vb.healthy() and (path is None or va.path == vb.path == path):
                r = self.lab.exec(A, ["ping", "-c", "1", "-W", "1", self.addr_b], check=False, timeout=10)
                if r.returncode == 0:
                    return
            time.sleep(0.3)
        raise proc.IpopError(f"fault lab: the link did not become healthy{' on a ' + path + ' path' if path else ''} "
                             f"within {timeout:.0f}s (A: {view_of(self.group, A)}, B: {view_of(self.group, B)})")

    def worker_pids(self, host: str) -> list[int]:
        assert self.group
        out = []
        for pid in node_pids(self.group, host):
            try:
                if b"ipop_switch.tunnel.poolproc" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(pid)
            except OSError:
                pass
        return out


# -- the scenarios ----------------------------------------------------------------------------

@dataclass
class Scenario:
    name: str
    inject: Callable[[FaultLab], None]
    clear: Callable[[FaultLab], None] | None = None   # run ``hold`` seconds after inject
    hold: float = 0.0
    prepare: Callable[[FaultLab], None] | None = None   # before the baseline (not measured)
    ready_path: str | None = None
    note: str = ""
    after: Callable[[FaultLab], None] | None = None     # cleanup once measured


def _kill_worker(f: FaultLab) -> None:
    pids = f.worker_pids(A)
    if not pids:
        raise proc.IpopError("no tunnel worker process found on ah1")
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def _kill_agent(f: FaultLab) -> None:
    """SIGKILL of the agent (its children die with it), then started again at once, as a
    service manager would."""
    assert f.group
    f.group.stop(A, kill=True)
    f.group.start(A)


def _loss(pct: float) -> Callable[[FaultLab], None]:
    def inject(f: FaultLab) -> None:
        # at bh1's port of the core bridge, both ways: every datagram of the link crosses it
        proc.run(["nft", "-f", "-"], netns=f.lab.core_ns, input=core_port_loss_ruleset("s2h1", pct))
    return inject


def _loss_clear(f: FaultLab) -> None:
    out = proc.run(["nft", "-a", "list", "ruleset"], netns=f.lab.core_ns).stdout
    for table in re.findall(r"^table (\S+ \S+)", out, re.M):
        if "loss" in table:
            proc.run(["nft", "delete", "table", *table.split()], netns=f.lab.core_ns)


def _flush_nat(f: FaultLab) -> None:
    """Every conntrack entry of ah1's NAT router dropped: its next datagram gets a new (random)
    public port, and the peer's datagrams to the old one are dropped."""
    proc.run(["conntrack", "-F"], netns=f.lab.netns_of("ar"), check=False)


def _roam(f: FaultLab) -> None:
    """ah1's LAN address changes (a laptop moving to another network: new address, same
    gateway), the old one gone at once."""
    ns = f.lab.netns_of(A)
    old = f.lab.host(A).lan_ip
    proc.run(["ip", "addr", "add", f"{ROAM_TO}/24", "dev", "eth0"], netns=ns)
    proc.run(["ip", "addr", "del", f"{old}/24", "dev", "eth0"], netns=ns)
    proc.run(["ip", "route", "replace", "default", "via", f.lab.host(A).gateway or ""], netns=ns)


def _roam_prepare(f: FaultLab) -> None:
    proc.run(["sysctl", "-q", "-w", "net.ipv4.conf.eth0.promote_secondaries=1"], netns=f.lab.netns_of(A))


def _block_direct(f: FaultLab) -> None:
    """Only the TURN relay works between the two (the direct path's UDP dropped at bh1)."""
    f.nft(B, drop_udp("nodirect", f.lab.host(A).public_ip))


def _restart(which: str) -> Callable[[FaultLab], None]:
    def inject(f: FaultLab) -> None:
        f.lab.stop_service(which)
        f.lab.start_service(which)
    return inject


SCENARIOS: list[Scenario] = [
    Scenario("1 % loss", _loss(1), _loss_clear, LOSS_SECONDS, note=f"{LOSS_SECONDS:.0f} s, both ways"),
    Scenario("10 % loss", _loss(10), _loss_clear, LOSS_SECONDS, note=f"{LOSS_SECONDS:.0f} s, both ways"),
    Scenario("XMPP server restarted", _restart("prosody")),
    Scenario("worker process killed", _kill_worker, note="SIGKILL; the agent restarts it"),
    Scenario("agent killed", _kill_agent, note="SIGKILL, started again at once"),
    Scenario("NAT mapping flushed", _flush_nat, note="conntrack -F at ah1's hard NAT"),
    Scenario(f"path cut {CUT_SECONDS:.0f} s", lambda f: f.nft(A, drop_udp("cut")),
             lambda f: f.nft_delete(A, "cut"), CUT_SECONDS, note="all UDP of ah1, TURN too; recover from the cut's end"),
    Scenario("underlay address changed", _roam, prepare=_roam_prepare, note=f"ah1's LAN address -> {ROAM_TO}"),
    Scenario("TURN server restarted", _restart("coturn"), prepare=_block_direct, ready_path="relay",
             note="on a relayed link (direct UDP blocked)", after=lambda f: f.nft_delete(B, "nodirect")),
]


def measure(f: FaultLab, sc: Scenario) -> Outcome:
    """One scenario against a healthy link: baseline, fault, recovery, tail."""
    assert f.group
    if sc.prepare:
        sc.prepare(f)
    f.wait_ready(path=sc.ready_path)
    pings = PingStream(f.lab, A, f.addr_b)
    sampler = Sampler(f.group)
    try:
        time.sleep(BASELINE)
        base = {h: sampler.last(h) for h in (A, B)}
        t_fault = time.time()
        sc.inject(f)
        t_ref = t_fault
        if sc.clear:
            time.sleep(max(0.0, sc.hold - (time.time() - t_fault)))
            sc.clear(f)
            t_ref = time.time()
        recovered_at = _wait_recovered(sampler, pings, t_ref)
        time.sleep(TAIL)
    finally:
        sampler.stop()
        pings.stop()
        if sc.after:
            sc.after(f)
    detect, went_down = _detect(sampler, base, t_fault)
    sent, lost, flowing = pings.since(t_fault)
    recover = None
    if recovered_at is not None:
        # nothing seen and nothing lost after the fault's end: there was nothing to recover from
        quiet = detect is None and not pings.since(t_ref)[1]
        recover = 0.0 if quiet else max(0.0, max(recovered_at, flowing or 0.0) - t_ref)
    return Outcome(sc.name, detect, None if recover is None else round(recover, 2), lost, sent,
                   went_down, sc.note)


def _deviates(v: View, base: View | None) -> bool:
    if not v.ok:
        return False                  # a node that is not running sees nothing
    if not v.healthy():
        return True
    return base is not None and (v.ups != base.ups or v.local != base.local)


def _detect(s: Sampler, base: dict, t_fault: float) -> tuple[float | None, bool]:
    first, down = None, False
    for h in (A, B):
        for v in s.views[h]:
            if v.t < t_fault:
                continue
            if (v.ok and v.state != "up") or (v.ok and base[h] and v.ups != base[h].ups):
                down = True
            if _deviates(v, base[h]):
                first = v.t if first is None else min(first, v.t)
                break
    return (None if first is None else round(first - t_fault, 2)), down


def _wait_recovered(s: Sampler, pings: PingStream, t_ref: float) -> float | None:
    """The time both nodes were healthy again and stayed so, with pings answered after it
    (None: not within RECOVER_TIMEOUT)."""
    deadline = time.monotonic() + RECOVER_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.3)
        since = None
        for h in (A, B):
            vs = [v for v in s.views[h] if v.t >= t_ref]
            bad = [v.t for v in vs if not v.healthy()]
            good = [v.t for v in vs if v.healthy() and (not bad or v.t > max(bad))]
            if not good:
                since = None
                break
            since = max(since or 0.0, min(good))
        if since is None:
            continue
        answered = [t for seq, t in pings.replies.items() if pings.sent_at(seq) >= since]
        if len(answered) >= 5:
            return since
    return None


def run_faults(*, console: Console, only: list[str] | None = None) -> dict:
    """All scenarios (or those whose name contains one of ``only``) in one lab."""
    proc.require_root()
    chosen = [s for s in SCENARIOS if not only or any(o.lower() in s.name.lower() for o in only)]
    if not chosen:
        raise proc.IpopError(f"no fault scenario matches {only}; known: {', '.join(s.name for s in SCENARIOS)}")
    f = FaultLab()
    outcomes: list[Outcome] = []
    try:
        with console.status("building the fault lab (hard NAT <-> public host) ..."):
            f.up()
            f.wait_ready()
        for sc in chosen:
            with console.status(f"fault: {sc.name} ..."):
                o = measure(f, sc)
            outcomes.append(o)
            console.print(f"  {o.name}: detect {_fmt(o.detect_s)}, recover {_fmt(o.recover_s)}, "
                          f"lost {o.lost}/{o.sent}")
    finally:
        f.down()
    return {"scenarios": [asdict(o) | {"recovered": o.recovered} for o in outcomes],
            "ok": all(o.recovered for o in outcomes), "ping_interval_s": PING_INTERVAL}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s"


def print_faults(report: dict, console: Console) -> None:
    t = Table(title="single faults on one link (hard NAT <-> public host), pings every 50 ms")
    for c in ("fault", "detect", "recover", "pings lost", "link down", "how"):
        t.add_column(c, justify="left" if c in ("fault", "how") else "right")
    for o in report["scenarios"]:
        quiet = o["detect_s"] is None and not o["link_went_down"]      # nothing to recover from
        rec = ("-" if quiet else _fmt(o["recover_s"])) if o["recovered"] else "[red]not recovered[/red]"
        t.add_row(o["name"], _fmt(o["detect_s"]), rec, f"{o['lost']} of {o['sent']}",
                  "yes" if o["link_went_down"] else "no", o["note"])
    console.print(t)
    console.print("detect: from the fault to the first node status showing it ('-': none did); "
                  "recover: until both links are up, signaling online and pings answered, "
                  "from the fault's end (cut, loss period) or the fault itself.")
