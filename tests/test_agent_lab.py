"""One link under the real agent (``ipop-switch up``) and switch app, as a user sees it:
``status`` (text and ``--json``), the Prometheus metrics, and what the link harness tests
check on bare workers (rekey, outage, worker crash, relay -> direct upgrade), here through
the agent, OVS and the OpenFlow app.

Two public hosts (a direct path between them), one GroupVPN overlay. The agents run with
short link timers ($IPSW_LINK_TIMERS: a rekey every 3 s, an upgrade probe every 2 s) so
these are seen in seconds. Every test starts from the link up on its direct path and
leaves it so (the module's agents are shared; the tests do not depend on their order)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import unique_name
from helpers.agent_lab import (agent_procs, cli, logs_on_failure, nft, nft_drop_udp, peer_of, ping_ok, status_json,
                               until, wait_peer, wait_up)
from ipop_switch import proc
from ipop_switch.agent.overlay import LINK_TIMERS_ENV
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.lab.nodes import LabGroup

A, B = "ah1", "bh1"
REKEY_AFTER = 3.0
UPGRADE_INTERVAL = 2.0
UP_TIMEOUT = 30.0
METRICS = "127.0.0.1:9465"          # what the lab writes in each node's config
# a packet refused for its key or counter: none may come from a rekey or a path change
KEY_DROPS = ("auth", "unknown_index", "no_session", "replay")


@pytest.fixture(scope="module")
def pair():
    lab = Lab(LabSpec(name=unique_name("r"), sites=(SiteSpec("a", "none"), SiteSpec("b", "none"))))
    group = None
    old = os.environ.get(LINK_TIMERS_ENV)
    try:
        lab.up()
        group = LabGroup(lab, "ag", net=94)
        os.environ[LINK_TIMERS_ENV] = json.dumps({"rekey_after": REKEY_AFTER, "upgrade_interval": UPGRADE_INTERVAL})
        for h in (A, B):
            group.add(h)
            group.start(h)
        with logs_on_failure(group):
            wait_up(group, UP_TIMEOUT, path="direct")
        yield lab, group
    finally:
        if old is None:
            os.environ.pop(LINK_TIMERS_ENV, None)
        else:
            os.environ[LINK_TIMERS_ENV] = old
        if group:
            group.stop_all()
        lab.down()


@pytest.fixture
def link(pair):
    """The pair with its link up on the direct path, and each side's peer entry now."""
    lab, g = pair
    with logs_on_failure(g):
        return lab, g, wait_up(g, UP_TIMEOUT, path="direct")


def _ping_stream(lab: Lab, host: str, addr: str, count: int, interval: float) -> subprocess.Popen:
    return lab.popen(host, ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "2", addr],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _lost(out: str) -> int:
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    return int(m.group(1)) - int(m.group(2))


def _key_drops(p: dict) -> dict:
    return {k: (p.get("drops") or {}).get(k, 0) for k in KEY_DROPS}


# ---------------------------------------------------------------- status and metrics
@pytest.mark.lab
def test_status_json_and_text(link):
    lab, g, _ = link
    with logs_on_failure(g):
        assert ping_ok(lab, A, g.nodes[B].ip)
        st = status_json(lab, g, A)
        assert st["node"]["node_id"] == g.nodes[A].node_id
        ov = st["overlays"][0]
        assert ov["name"] == "ag" and ov["bridge"] == "ipswag" and ov["address"] == g.nodes[A].address
        (p,) = ov["peers"]
        assert p["node_id"] == g.nodes[B].node_id and p["state"] == "up" and p["path"] == "direct", p
        assert isinstance(p["rtt_ms"], float) and 0 < p["rtt_ms"] < 1000, p
        assert p["tx_bytes"] > 0 and p["rx_bytes"] > 0, p
        r = cli(lab, A, "status", "-c", str(g.nodes[A].config))
        assert r.returncode == 0, r.stderr
        text = r.stdout
        print("\n" + text)
        assert g.nodes[A].node_id in text                      # the node line
        row = next((l for l in text.splitlines() if g.nodes[B].node_id[:12] in l), None)
        assert row is not None, text                            # the peer, by its node id prefix
        assert re.search(r"\bup\b", row) and "direct" in row, row
        assert "ms" in row, row                                 # its RTT


def test_status_without_agent_is_one_line_error(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\nstate_dir = "{tmp_path / "state"}"\n'
                   '[[overlay]]\nname = "x"\naddress = "100.94.0.9/16"\n'
                   '[overlay.xmpp]\nserver = "198.18.0.1"\njid = "a@ipsw.test"\npassword = "p"\n')
    argv = [sys.executable, "-m", "ipop_switch.cli", "status", "-c", str(cfg)]
    for extra in ([], ["--json"]):
        r = subprocess.run(argv + extra, capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ipop-switch: error: no agent running"), r.stderr
    # a socket left by an agent that was killed: nobody listens on it
    (tmp_path / "state").mkdir()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "state" / "agent.sock"))
    s.close()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("ipop-switch: error: agent at"), r.stderr


def _metrics(lab: Lab, host: str) -> dict[tuple[str, tuple], float]:
    """/metrics of the agent in ``host``'s namespace: {(sample name, sorted labels): value}."""
    code = ("import urllib.request, sys; "
            f"sys.stdout.write(urllib.request.urlopen('http://{METRICS}/metrics', timeout=5).read().decode())")
    text = lab.exec(host, [sys.executable, "-c", code], timeout=20).stdout
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.mark.lab
def test_metrics_match_status(link):
    lab, g, _ = link
    with logs_on_failure(g):
        assert ping_ok(lab, A, g.nodes[B].ip, count=5)
        # one-way traffic, so that sent and received differ and a swapped direction shows
        lab.exec(A, [sys.executable, "-c", "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                     f"[s.sendto(bytes(1200), ('{g.nodes[B].ip}', 9)) for _ in range(200)]"])
        before = g.status(A)["overlays"][0]["peers"][0]
        assert before["tx_bytes"] > before["rx_bytes"] + 150_000, before
        m = _metrics(lab, A)
        after = g.status(A)["overlays"][0]["peers"][0]
        peer = g.nodes[B].node_id

        def val(name: str, **labels) -> float:
            key = (name, tuple(sorted({"overlay": "ag", **labels}.items())))
            assert key in m, (key, sorted(k for k in m if k[0].startswith("ipsw")))
            return m[key]
        assert val("ipsw_peers") == 1
        assert val("ipsw_peer_up", peer=peer) == 1 and before["state"] == after["state"] == "up"
        assert val("ipsw_peer_direct", peer=peer) == 1 and after["path"] == "direct"
        assert 0 < val("ipsw_peer_rtt_seconds", peer=peer) < 1
        for d in ("tx", "rx"):
            for what in ("bytes", "frames"):
                got = val(f"ipsw_peer_{what}_total", peer=peer, direction=d)
                assert 0 < before[f"{d}_{what}"] <= got <= after[f"{d}_{what}"], (d, what, before, got, after)
        # counters only grow: after more traffic, a second scrape is at least the first
        assert ping_ok(lab, A, g.nodes[B].ip, count=3)
        m2 = _metrics(lab, A)
        for d in ("tx", "rx"):
            key = ("ipsw_peer_bytes_total", tuple(sorted({"overlay": "ag", "peer": peer, "direction": d}.items())))
            assert m2[key] > m[key], (d, m[key], m2[key])


# ---------------------------------------------------------------- link behaviour
@pytest.mark.lab
def test_rekey_during_a_ping_stream(link):
    """The controlling side rekeys every REKEY_AFTER s: status shows the handshake age reset
    again and again while a ping stream loses nothing and the link never goes down."""
    lab, g, peers = link
    with logs_on_failure(g):
        ups = {h: p["ups"] for h, p in peers.items()}
        drops = {h: _key_drops(p) for h, p in peers.items()}
        ping = _ping_stream(lab, A, g.nodes[B].ip, count=60, interval=0.15)
        ages, resets = [], 0
        deadline = time.monotonic() + 30
        while ping.poll() is None and time.monotonic() < deadline:
            age = peer_of(g, A)["last_handshake_s"]
            if ages and age is not None and ages[-1] is not None and age < ages[-1] - 0.5:
                resets += 1
            ages.append(age)
            time.sleep(0.3)
        out, _ = ping.communicate(timeout=10)
        after = {h: peer_of(g, h) for h in g.nodes}
        print(f"\nrekeys seen in status over {len(ages) * 0.3:.0f} s: {resets}; handshake ages {ages}")
        assert resets >= 2, ages
        assert max(a for a in ages if a is not None) < REKEY_AFTER + 3, ages
        assert _lost(out) == 0, out
        for h in g.nodes:
            assert after[h]["state"] == "up" and after[h]["ups"] == ups[h], (h, after[h])
            assert _key_drops(after[h]) == drops[h], (h, drops[h], after[h]["drops"])


@pytest.mark.lab
def test_outage_shows_connecting_then_recovers(link):
    """All UDP of one host cut for 6 s (signaling over TCP stays): both sides report the link
    not up, then up again once the path is back, and pings go through again."""
    lab, g, peers = link
    with logs_on_failure(g):
        ups = {h: p["ups"] for h, p in peers.items()}
        nft(lab, A, nft_drop_udp("outage"))
        t0 = time.monotonic()
        try:
            for h in g.nodes:
                wait_peer(g, h, lambda p: p["state"] == "connecting", 10, "link to leave 'up' during the outage")
            detect = time.monotonic() - t0
            assert not ping_ok(lab, A, g.nodes[B].ip, count=1)
            time.sleep(max(0.0, 6.0 - (time.monotonic() - t0)))    # the outage lasts 6 s
        finally:
            proc.run(["nft", "delete", "table", "inet", "outage"], netns=lab.netns_of(A), check=False)
        t1 = time.monotonic()
        wait_up(g, UP_TIMEOUT)
        recover = time.monotonic() - t1
        print(f"\noutage: link reported down after {detect:.1f} s, up {recover:.1f} s after the path came back")
        assert detect < 8.0
        assert recover < 20.0
        assert ping_ok(lab, A, g.nodes[B].ip)
        for h in g.nodes:
            assert peer_of(g, h)["ups"] > ups[h]


@pytest.mark.lab
def test_killed_worker_process_is_restarted_and_link_returns(link):
    lab, g, peers = link
    with logs_on_failure(g):
        ups = peers[A]["ups"]
        (worker,) = agent_procs(g, A).workers
        t0 = time.monotonic()
        os.kill(worker, 9)
        until(lambda: peer_of(g, A)["ups"] > ups and peer_of(g, A)["state"] == "up", 20,
              "the link up again after the worker process was killed")
        took = time.monotonic() - t0
        new = agent_procs(g, A).workers
        print(f"\nworker process SIGKILL: link up again after {took:.1f} s (worker {worker} -> {new})")
        assert len(new) == 1 and new[0] != worker
        assert ping_ok(lab, A, g.nodes[B].ip) and ping_ok(lab, B, g.nodes[A].ip)
        assert peer_of(g, A)["port"] == peers[A]["port"]          # the TAP is a port of the bridge again


def _counted(lab: Lab, host: str, table: str) -> int:
    """Packets the drop rules of ``table`` have counted so far."""
    out = lab.exec(host, ["nft", "-j", "list", "table", "inet", table]).stdout
    return sum(e["counter"]["packets"] for item in json.loads(out)["nftables"] if "rule" in item
               for e in item["rule"]["expr"] if "counter" in e)


@pytest.mark.lab
def test_relayed_link_upgrades_to_direct(link):
    """Direct UDP between the hosts blocked (TURN still reachable): the link comes back over
    the relay; probes for a direct path fail while blocked and leave the relay working; once
    unblocked the path moves to direct without going down and without losing a ping."""
    lab, g, peers = link
    with logs_on_failure(g):
        b_ip = lab.host(B).public_ip
        rules = nft_drop_udp("nodirect", b_ip).replace("meta l4proto udp drop", "meta l4proto udp counter drop")
        nft(lab, A, rules)
        try:
            relayed = wait_up(g, UP_TIMEOUT, path="relay")          # the old direct path dies, ICE falls back
            ups = {h: p["ups"] for h, p in relayed.items()}
            assert ping_ok(lab, A, g.nodes[B].ip)
            # a probe runs while blocked (its checks hit the drop rules) and the relay stays up
            n0 = _counted(lab, A, "nodirect")
            until(lambda: _counted(lab, A, "nodirect") > n0, 6 * UPGRADE_INTERVAL, "a direct-path probe while blocked")
            for h in g.nodes:
                p = peer_of(g, h)
                assert p["state"] == "up" and p["path"] == "relay" and p["ups"] == ups[h], (h, p)
            drops = {h: _key_drops(peer_of(g, h)) for h in g.nodes}
        finally:
            proc.run(["nft", "delete", "table", "inet", "nodirect"], netns=lab.netns_of(A), check=False)
        t0 = time.monotonic()
        ping = _ping_stream(lab, A, g.nodes[B].ip, count=200, interval=0.05)
        try:
            wait_up(g, 6 * UPGRADE_INTERVAL + 10, path="direct")
            took = time.monotonic() - t0
        finally:
            out, _ = ping.communicate(timeout=30)
        print(f"\nrelay -> direct upgrade {took:.1f} s after the path opened; pings lost: {_lost(out)}")
        assert _lost(out) == 0, out
        for h in g.nodes:
            p = peer_of(g, h)
            assert p["ups"] == ups[h], (h, p)                     # make before break: never down
            assert _key_drops(p) == drops[h], (h, drops[h], p["drops"])
