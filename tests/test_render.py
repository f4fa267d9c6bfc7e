"""The status tables and the metrics read the status document as the agent writes it: the
switch app's refusals (over the MAC caps, foreign datapaths) show in both."""

from __future__ import annotations

from io import StringIO

from rich.console import Console

from ipop_switch.agent.metrics import StatusCollector
from ipop_switch.render import render_lab, render_status

STATUS = {
    "node": {"node_id": "ab" * 16, "pid": 7, "uptime_s": 90, "tunnel_loops": "c"},
    "overlays": [{
        "name": "grp", "kind": "group", "bridge": "ipswgrp", "address": "100.99.0.1/16",
        "signaling": {"state": "online", "server": "198.18.0.1", "drops": {"stale": 2}},
        "switch": {"packet_in": 40, "macs_refused": 3, "datapaths_refused": 1},
        "peers": [{"node_id": "cd" * 16, "subject": "CN=h2,UID=x", "state": "up", "path": "direct",
                   "candidates": "host->host", "remote_addr": "udp 198.18.1.2:4000", "rtt_ms": 0.9,
                   "tx_bytes": 2048, "rx_bytes": 10, "drops": {"auth": 1}, "last_handshake_s": 5, "uptime_s": 60}],
    }],
}


def text(fn, st) -> str:
    c = Console(file=StringIO(), width=250)
    fn(st, c)
    return c.file.getvalue()


def test_status_text_shows_the_peer_and_the_switch_refusals():
    out = text(render_status, STATUS)
    assert "node " + "ab" * 16 in out and "tunnel loops in c" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("cd" * 6))
    for want in ("h2", "up", "direct (host->host)", "198.18.1.2:4000", "0.90 ms", "2.0 KiB / 10 B", "auth 1", "5s ago"):
        assert want in line, (want, line)
    assert "dropped messages: stale 2" in out
    assert "switch app: datapaths refused 1, macs refused 3" in out


def test_metrics_carry_the_same_figures():
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for m in StatusCollector(lambda: STATUS).collect() for s in m.samples}
    peer = ("overlay", "grp"), ("peer", "cd" * 16)
    assert samples[("ipsw_peer_up", peer)] == 1
    assert samples[("ipsw_peer_bytes_total", (("direction", "tx"),) + peer)] == 2048
    assert samples[("ipsw_peer_drops_total", peer + (("reason", "auth"),))] == 1
    assert samples[("ipsw_switch_events_total", (("event", "macs_refused"), ("overlay", "grp")))] == 3
    assert samples[("ipsw_signaling_drops_total", (("overlay", "grp"), ("reason", "stale")))] == 2


def test_lab_tables():
    st = {"name": "lab", "hosts": [{"name": "s1h1", "site": "s1", "nat": "easy", "lan_ip": "100.64.1.10",
                                     "public_ip": "198.18.1.1", "netns": "ipsw-lab-s1h1", "up": True}],
          "services": {"xmpp": {"address": "198.18.0.1", "port": 5222, "domain": "ipsw.test", "muc": "c.ipsw.test",
                                "ca": "/x/ca.crt", "running": True},
                       "turn": {"address": "198.18.0.2", "port": 3478, "stun2": "198.18.0.3", "user": "lab",
                                "running": False}}}
    out = text(render_lab, st)
    assert "s1h1" in out and "198.18.1.1" in out and "easy" in out
    assert "STUN/TURN (coturn)" in out and "NO" in out
