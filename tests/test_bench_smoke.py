"""A short ``ipop-switch bench`` through the real CLI: one round of 2 s for ipop-switch and the
underlay only. It exits 0, reports positive TCP figures for both (and for ipop-switch over
the relayed and the lossy path; over the relay both ways and against coturn's own limit, also
with coturn scheduled first), measures and installs nothing it was not asked for, and
removes its labs. Then each peer added for issue 21 (nebula, OpenVPN, n2n) alone, briefly:
set up as the bench sets it up, it carries TCP in outer UDP and leaves no process behind;
skipped when its Debian package is not installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ipop_switch.bench.run import PEERS
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
    # both ways and coturn's own limit, with coturn at its default scheduling and scheduled first
    for first in ("", "_first"):
        assert ours[f"tcp1_relay{first}_mbit"] > 0 and ours[f"tcp1_relay{first}_reverse_mbit"] > 0, ours
        assert ours[f"coturn{first}_limit_mbit"] > 0 and ours[f"coturn{first}_limit_reverse_mbit"] > 0, ours
        assert 0 < ours[f"coturn{first}_fraction"] == round(
            ours[f"tcp1_relay{first}_mbit"] / ours[f"coturn{first}_limit_mbit"], 2), ours
    assert "scheduled first" in r.stdout, r.stdout[-3000:]
    assert ours["tcp1_loss1_mbit"] > 0, ours
    assert ours["path"] == "direct" and ours["outer_udp"] is True and ours["up_after_flood"] is True, ours
    assert ours["ping_ms"] and ours["ping_ms"] > 0, ours
    assert set(list_labs()) <= labs_before, set(list_labs()) - labs_before


def _running(names: set[str]) -> set[int]:
    """Pids of the processes whose program is one of ``names``."""
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv0 = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if argv0 and Path(argv0).name in names:
                pids.add(int(d.name))
    return pids


@pytest.mark.parametrize("peer", ["nebula", "openvpn", "n2n"])
def test_bench_peer_smoke(tmp_path, peer):
    missing = [f"{b} (Debian package {pkg})" for b, pkg in PEERS[peer].NEEDS if not shutil.which(b)]
    if missing:
        pytest.skip(f"{peer} not installed: {', '.join(missing)} (./bootstrap.sh install)")
    out = tmp_path / "bench.json"
    programs = {b for b, _ in PEERS[peer].NEEDS}
    before, labs_before = _running(programs), set(list_labs())
    r = subprocess.run([sys.executable, "-m", "ipop_switch.cli", "bench", "--runs", "1", "--seconds", "2",
                        "--systems", peer, "--json", str(out)], capture_output=True, text=True, timeout=BENCH_TIMEOUT)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr
    report = json.loads(out.read_text())
    assert report["skipped"] == {}, report["skipped"]
    res = report["results"][peer]
    print(f"\nbench smoke {peer}: TCP 1 stream {res['tcp1_mbit']['median']:.0f} Mbit/s, 4 streams "
          f"{res['tcp4_mbit']['median']:.0f}, ping {res['ping_ms']} ms, CPU {res['cpu_per_s']:.2f}, RSS {res['rss_mb']} MB")
    assert res["tcp1_mbit"]["median"] > 0 and res["tcp4_mbit"]["median"] > 0, res
    assert res["ping_ms"] and res["ping_ms"] > 0, res
    assert res["cpu_per_s"] and res["cpu_per_s"] > 0 and res["rss_mb"] and res["rss_mb"] > 0, res
    assert res["outer_udp"] is True, res          # for n2n: edge to edge, not through the supernode
    if peer == "openvpn":
        assert res["cipher"] == "AES-256-GCM", res
    assert not _running(programs) - before, f"{peer} processes left: {_running(programs) - before}"
    assert set(list_labs()) <= labs_before, set(list_labs()) - labs_before
