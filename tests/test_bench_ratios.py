"""The bench's ratios: ipop-switch against the best of all measured peers (highest median
throughput, lowest RTT) and against each; the underlay and our own guest view are no peers."""

from __future__ import annotations

from ipop_switch.bench.run import ratio_lines, ratios


def _r(tcp1: float | None, tcp4: float | None, ping: float | None) -> dict:
    m = lambda x: {"min": x, "median": x, "max": x} if x is not None else None   # noqa: E731
    return {"tcp1_mbit": m(tcp1), "tcp4_mbit": m(tcp4), "ping_ms": ping, "cpu_per_s": None, "rss_mb": None}


def test_best_of_all_peers_per_metric():
    res = {"underlay": _r(10000, 20000, 0.05), "ipop-switch": _r(3000, 3600, 0.9),
           "ipop-switch guest-to-guest": _r(2500, 3000, 1.0),
           "wireguard-go": _r(500, 400, 0.6), "tinc": _r(450, 420, 0.3), "nebula": _r(600, 300, 0.45),
           "openvpn": _r(None, None, None), "n2n": _r(200, 250, 0.25)}
    r = ratios(res)
    assert r["tcp1_mbit"]["best"] == "nebula" and r["tcp1_mbit"]["ratio"] == 5.0
    assert r["tcp4_mbit"]["best"] == "tinc" and r["tcp4_mbit"]["ratio"] == round(3600 / 420, 2)
    assert r["ping_ms"]["best"] == "n2n" and r["ping_ms"]["ratio"] == 3.6
    # a peer without figures is in no comparison; the underlay and our guests never
    assert set(r["tcp1_mbit"]["each"]) == {"wireguard-go", "tinc", "nebula", "n2n"}
    assert r["tcp1_mbit"]["each"]["n2n"] == 15.0
    lines = ratio_lines(res)
    assert len(lines) == 3 and "best peer (nebula)" in lines[0] and "5.00x" in lines[0]


def test_nothing_to_compare():
    assert ratios({"underlay": _r(1, 1, 0.1), "ipop-switch": _r(1, 1, 0.1)}) == {}
    assert ratios({"nebula": _r(1, 1, 0.1)}) == {}
    assert ratio_lines({}) == []
