"""The benchmark's SocialVPN row through the real CLI, briefly: ``ipop-switch bench --social``
(one round of 2 s) sets up the GroupVPN pair and the SocialVPN pair (two users, friends, the
same own address: translated) between the same two hosts, measures both, prints the
comparison and removes its lab. Speed targets are the bench's business (docs/benchmarks.md):
here only that the row is real -- traffic flowed, over a direct path, translated."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ipop_switch.lab import list_labs

pytestmark = [pytest.mark.lab, pytest.mark.slow]

BENCH_TIMEOUT = 240.0


def test_bench_social_row(tmp_path):
    out = tmp_path / "bench.json"
    labs_before = set(list_labs())
    r = subprocess.run([sys.executable, "-m", "ipop_switch.cli", "bench", "--social", "--runs", "1", "--seconds", "2",
                        "--json", str(out)], capture_output=True, text=True, timeout=BENCH_TIMEOUT)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr
    report = json.loads(out.read_text())
    res = report["results"]
    assert set(res) == {"ipop-switch", "ipop-switch social"}, res      # no guests, no peers
    soc, grp = res["ipop-switch social"], res["ipop-switch"]
    for x in (soc, grp):
        assert x["tcp1_mbit"]["median"] > 0 and x["tcp4_mbit"]["median"] > 0, x
        assert x["ping_ms"] and x["ping_ms"] > 0 and x["path"] == "direct", x
    assert soc["translated"] and soc["translated"] > 100, soc      # frames rewritten to b's view
    cmp = report["social_vs_group"]
    assert cmp["tcp1_ratio"] > 0 and cmp["tcp4_ratio"] > 0 and "diff" in cmp["ping_ms"], cmp
    assert "ipop-switch social / ipop-switch" in r.stdout, r.stdout[-2000:]
    assert "ipop-switch social" not in json.dumps(report["vs_best_peer"])        # ours, not a peer
    print(f"\nbench --social: TCP 1 stream social {soc['tcp1_mbit']['median']:.0f} vs group "
          f"{grp['tcp1_mbit']['median']:.0f} Mbit/s, RTT {soc['ping_ms']} vs {grp['ping_ms']} ms", file=sys.stderr)
    assert set(list_labs()) <= labs_before, set(list_labs()) - labs_before
