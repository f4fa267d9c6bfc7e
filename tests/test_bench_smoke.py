"""A short ``ipop-switch bench`` through the real CLI: one round of 2 s for ipop-switch and the
underlay only. It exits 0, reports positive TCP figures for both (and for ipop-switch over
the relayed and the lossy path), measures and installs nothing it was not asked for, and
removes its labs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ipop_switch.lab import list_labs

pytestmark = [pytest.mark.lab, pytest.mark.slow]

BENCH_TIMEOUT = 240.0


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    labs_before = set(list_labs())
    r = subprocess.run([sys.executable, "-m", "ipop_switch.cli", "bench", "--runs", "1", "--seconds", "2",
                        "--systems", "ipop-switch,underlay", "--json", str(out)],
                       capture_output=True, text=True, timeout=BENCH_TIMEOUT)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr
    # peers not asked for are neither installed nor measured
    assert "installing" not in r.stdout, r.stdout
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"ipop-switch", "ipop-switch guest-to-guest", "underlay"}, res
    ours, under, guests = res["ipop-switch"], res["underlay"], res["ipop-switch guest-to-guest"]
    print(f"\nbench smoke: ipop-switch TCP 1 stream {ours['tcp1_mbit']['median']:.0f} Mbit/s, 4 streams "
          f"{ours['tcp4_mbit']['median']:.0f}; underlay {under['tcp1_mbit']['median']:.0f}; relay "
          f"{ours['tcp1_relay_mbit']}, 1 % loss {ours['tcp1_loss1_mbit']}")
    print(f"guest-to-guest: 1 stream {guests['tcp1_mbit']['median']:.0f}, 4 streams {guests['tcp4_mbit']['median']:.0f}")
    assert guests["ping_ms"] and guests["ping_ms"] > 0, guests
    for r_ in (ours, under, guests):
        assert r_["tcp1_mbit"]["median"] > 0 and r_["tcp4_mbit"]["median"] > 0, r_
    assert ours["tcp1_relay_mbit"] > 0 and ours["relay_path"] == "relay", ours
    assert ours["tcp1_loss1_mbit"] > 0, ours
    assert ours["path"] == "direct" and ours["outer_udp"] is True and ours["up_after_flood"] is True, ours
    assert ours["ping_ms"] and ours["ping_ms"] > 0, ours
    assert set(list_labs()) <= labs_before, set(list_labs()) - labs_before
