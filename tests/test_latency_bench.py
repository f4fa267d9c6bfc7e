"""bench/latency.py without a lab: the capture's parsing of tcpdump lines and the RTT summary."""

from __future__ import annotations

from ipop_switch.bench.latency import _after, _icmp, _udp, spread

ROWS = [
    (10.000100, "IP 100.96.0.1 > 100.96.0.2: ICMP echo request, id 7, seq 1, length 64"),
    (10.000300, "IP 100.96.0.2 > 100.96.0.1: ICMP echo reply, id 7, seq 1, length 64"),
    (10.000350, "IP 100.96.0.1 > 100.96.0.2: ICMP echo request, id 7, seq 1, length 64"),   # seen again: ignored
    (10.050100, "IP 100.96.0.1 > 100.96.0.2: ICMP echo request, id 7, seq 2, length 64"),
    (10.000150, "IP 198.18.1.10.40000 > 198.18.2.10.50000: UDP, length 132"),
    (10.000250, "IP 198.18.2.10.50000 > 198.18.1.10.40000: UDP, length 132"),
    (10.000260, "IP 198.18.1.100.40000 > 198.18.2.10.50000: UDP, length 132"),              # another host
]


def test_icmp_first_sighting_per_sequence_number():
    assert _icmp(ROWS, "request") == {1: 10.000100, 2: 10.050100}
    assert _icmp(ROWS, "reply") == {1: 10.000300}


def test_udp_by_source_address_exactly():
    assert _udp(ROWS, "198.18.1.10") == [10.000150]
    assert _udp(ROWS, "198.18.2.10") == [10.000250]


def test_after_takes_the_first_within_the_window():
    times = [1.0, 1.002, 1.5]
    assert _after(times, 1.0) == 1.002          # strictly after
    assert _after(times, 1.1) is None           # 1.5 is beyond 10 ms
    assert _after(times, 1.1, within=0.5) == 1.5


def test_spread_of_rtts_and_of_nothing():
    s = spread([float(x) for x in range(1, 101)])
    assert s == {"median": 50.5, "p10": 11.0, "p90": 91.0, "n": 100}
    assert spread([]) == {"median": None, "p10": None, "p90": None, "n": 0}
