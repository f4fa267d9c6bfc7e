"""The CI soak (issue 18 item 5): ``run_soak(1.5)``, the same code as ``ipop-switch bench --soak``,
for 90 s: 8 agents, 28 links with pings on each, a rekey at 60 s, one 10 s cut in the
middle. The run must pass its own verdict (RSS, fds, no stuck link, the cut recovered) and the
figures behind it must be there: enough samples, every link rekeyed, the cut seen as an outage,
and nothing of the lab left afterwards."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from ipop_switch.bench.soak import FD_TOLERANCE, RECOVER_TIMEOUT, Cut, PingLog, Soak, cut_plan, print_soak, run_soak
from ipop_switch.lab import list_labs


def test_cut_plan():
    assert cut_plan(120) == [55.0]                       # short runs: one cut, in the middle
    assert cut_plan(600) == [180.0, 360.0, 540.0]        # every 3 min while cut + recovery fit
    assert len(cut_plan(3600)) == 19


def test_stuck_pairs_from_ping_logs(tmp_path):
    """The stuck-link verdict reads ping -D logs: a silence of more than 10 s is stuck, unless
    it lies in the pair's own cut (cut + recovery); a partial line is read once complete."""
    soak = Soak(2, console=Console())
    logs = {}
    for a, b, gap in (("k1h1", "k2h1", (1010.0, 1030.0)), ("k1h1", "k3h1", (1010.0, 1030.0)),
                      ("k2h1", "k3h1", None)):
        lines = [f"[{t:.6f}] 64 bytes from 100.92.0.2: icmp_seq={i} ttl=64 time=0.5 ms"
                 for i, t in enumerate((1000 + k * 0.5 for k in range(120)), 1)
                 if gap is None or not gap[0] < t < gap[1]]
        lines.insert(30, "[1014.000000] no answer yet for icmp_seq=29")
        path = tmp_path / f"{a}-{b}.ping"
        path.write_text("PING 100.92.0.2 56(84) bytes of data.\n" + "\n".join(lines) + "\n[1059.9")
        logs[(a, b)] = PingLog(a, b, path)
    soak.pings = list(logs.values())
    cut = Cut("k2h1", "k1h1", at=9.0, wall=1009.0, removed_wall=1019.0, recovered_s=5.0)
    soak.cuts = [cut]
    stuck = soak._stuck(1000.0, 1060.0)
    assert [s["pair"] for s in stuck] == ["k1h1-k3h1"], stuck      # k1h1-k2h1's gap is its cut's
    assert stuck[0]["silent_s"] == 20.0, stuck
    p = logs[("k2h1", "k3h1")]
    assert p.sent == 120 and len(p.replies) == 120 and p.count(1000.0, 1010.0) == 20
    cut.recovered_s = None                              # not recovered: excused until the timeout
    assert [s["pair"] for s in soak._stuck(1000.0, 1060.0)] == ["k1h1-k3h1"]


@pytest.mark.lab
@pytest.mark.slow
def test_soak_ninety_seconds():
    labs_before = set(list_labs())
    console = Console(width=140)
    report = run_soak(1.5, console=console)
    print_soak(report, console)
    json.dumps(report)                                     # the CLI writes it with --json
    assert report["ok"], report["failures"]
    samples = report["samples"]
    assert len(samples) >= 8, len(samples)
    assert samples[-1]["t"] >= 85, samples[-1]["t"]        # it ran the whole 90 s
    want = 8 * 7
    assert samples[-1]["links_up"] == want and not report["stuck"], report["stuck"]
    # traffic on every link the whole time: every pair answered in every window but a cut's
    assert all(not s["silent_pairs"] for s in samples[1:] if not s["in_cut"]), [s["silent_pairs"] for s in samples]
    assert report["pings"]["received"] > 0.95 * report["pings"]["sent"] > 0, report["pings"]
    (cut,) = report["cuts"]
    assert cut["down_after_s"] is not None, cut           # the cut was an outage the agents saw
    assert cut["recovered_s"] is not None and cut["recovered_s"] <= RECOVER_TIMEOUT, cut
    assert report["fd_growth"] <= FD_TOLERANCE, report["fds"]
    assert report["rss_growth_pct"] <= report["rss_bound_pct"], report["rss_mb"]
    assert report["rekeys"] >= report["links"], report["rekeys"]   # each link got a new session
    assert report["max_session_age_s"] <= 80, report["max_session_age_s"]
    assert all(s["flows"] for s in samples), [s["flows"] for s in samples]
    assert set(list_labs()) <= labs_before, set(list_labs()) - labs_before
