"""The web view without the lab: link-summary messages (parse, bounds, drops), the
subscription lease (a node sends only while someone watches), the page's graph model,
the HTTP server on a real socket (page, graph, event stream, Host check, read-only), and
bad config: an invalid or busy port is one error line."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from ipop_switch.agent import summaries as S
from ipop_switch.config import ConfigError, load_config
from ipop_switch.errors import IpopError
from ipop_switch.web.model import build_graph
from ipop_switch.web.server import WebServer

def arun(f):
    """Run an async test on a fresh loop (the suite has no asyncio plugin)."""
    @functools.wraps(f)
    def wrapper(*a, **kw):
        return asyncio.run(f(*a, **kw))
    return wrapper


A, B, C, D = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)


def link(peer: str, **kw) -> dict:
    return {"peer": peer, "state": "up", "path": "direct", "rtt_ms": 1.5, "tx_bps": 100.0, "rx_bps": 50.0,
            "role": "all-to-all", "uptime_s": 12.0, "cand": "host->srflx", "hs_s": 3.0, "drops": {}, **kw}


# -- messages -----------------------------------------------------------------------------------
def test_summary_roundtrip_and_bounds():
    links = [S.parse_link(link(B)), S.parse_link(link(C, path="relay"))]
    body = S.summary_payload(7, links)
    seq, parsed, more = S.parse_summary(body)
    assert (seq, more) == (7, 0) and parsed == links
    # many links: the busiest kept within the limits, the rest counted in 'more'
    many = [S.LinkSummary(f"{i:032x}", "up", "direct", 1.0, float(i), 0.0, "long", 1.0, "host->host", 1.0,
                          {f"reason{j}": j + 1 for j in range(S.MAX_DROPS)}) for i in range(200)]
    body = S.summary_payload(1, many)
    assert S.body_size(body) <= S.MAX_BYTES and len(body["links"]) <= S.MAX_LINKS
    assert body["more"] == 200 - len(body["links"])
    S.parse_summary(body)


@pytest.mark.parametrize("bad", [
    None, [], {"v": 2, "seq": 1, "links": []}, {"v": 1, "seq": -1, "links": []}, {"v": 1, "seq": True, "links": []},
    {"v": 1, "seq": 1, "links": {}}, {"v": 1, "seq": 1, "links": [link("nope")]},
    {"v": 1, "seq": 1, "links": [link(B, path="teleport")]}, {"v": 1, "seq": 1, "links": [link(B, rtt_ms=-1)]},
    {"v": 1, "seq": 1, "links": [link(B, tx_bps=float("inf"))]}, {"v": 1, "seq": 1, "links": [link(B, role="x" * 99)]},
    {"v": 1, "seq": 1, "links": [link(B, drops={"a": -1})]}, {"v": 1, "seq": 1, "links": [link(B), link(B)]},
    {"v": 1, "seq": 1, "links": [link(B, drops={f"r{i}": 1 for i in range(20)})]},
    {"v": 1, "seq": 1, "links": [link(f"{i:032x}") for i in range(S.MAX_LINKS + 1)]},
    {"v": 1, "seq": 1, "links": [], "pad": "x" * (S.MAX_BYTES + 1)},
])
def test_malformed_summaries_are_refused(bad):
    with pytest.raises(S.SummaryError):
        S.parse_summary(bad)


def test_rates_from_counters():
    r = S.Rates()
    assert r.update(B, 10.0, 1000, 0) == (0.0, 0.0)              # first sample: no rate yet
    assert r.update(B, 12.0, 3000, 500) == (8000.0, 2000.0)      # bit/s
    assert r.update(B, 13.0, 10, 600) == (0.0, 0.0)              # a counter reset: no negative rate
    peers = [{"node_id": C, "state": "up", "path": "relay", "rtt_ms": 2.0, "tx_bytes": 0, "rx_bytes": 0,
              "role": "all-to-all", "uptime_s": 5.0, "candidates": "relay->host", "last_handshake_s": 1.25,
              "drops": {"replay": 3, "zero": 0}}]
    out = S.summarize(peers, r, 1.0)
    assert out[0].path == "relay" and out[0].drops == {"replay": 3} and out[0].candidates == "relay->host"


class Net:
    """Members and a send that records (the summaries' two hooks into signaling)."""

    def __init__(self, members, links=()):
        self.members = set(members)
        self.out: list[tuple[str, str, dict]] = []
        self.links = list(links)

    async def send(self, peer, type_, payload):
        self.out.append((peer, type_, payload))

    async def get_links(self):
        return self.links

    def hooks(self):
        return S.SummaryHooks(members=lambda: self.members, send=self.send, links=self.get_links)


@arun
async def test_source_sends_only_while_a_lease_runs(monkeypatch):
    monkeypatch.setattr(S, "INTERVAL", 0.05)
    now = [100.0]
    net = Net({B, C}, [{"node_id": B, "state": "up", "path": "direct", "tx_bytes": 1, "rx_bytes": 1}])
    s = S.LinkSummaries(A, net.hooks(), clock=lambda: now[0])
    await asyncio.sleep(0.15)
    assert net.out == []                                         # nobody watches: nothing sent
    await s.on_message(B, S.SUBSCRIBE, {"lease": 30})
    await asyncio.sleep(0.12)
    sent = [x for x in net.out if x[1] == S.SUMMARY]
    assert sent and all(p == B for p, _, _ in sent)
    seq, links, _ = S.parse_summary(sent[-1][2])
    assert [l.peer for l in links] == [B]
    now[0] += 31                                                 # the lease ran out: the source stops
    await asyncio.sleep(0.12)
    n = len(net.out)
    await asyncio.sleep(0.12)
    assert len(net.out) == n and s.subscribers == {}
    await s.on_message(C, S.SUBSCRIBE, {"lease": 30})
    await s.on_message(C, S.SUBSCRIBE, {"lease": 0})             # cancelled at once
    assert s.subscribers == {}
    await s.stop()


@arun
async def test_bad_input_dropped_and_counted():
    net = Net({B})
    s = S.LinkSummaries(A, net.hooks())
    await s.on_message(D, S.SUBSCRIBE, {"lease": 10})            # not a member
    await s.on_message(B, S.SUBSCRIBE, {"lease": 9999})          # lease too long
    await s.on_message(B, S.SUMMARY, {"v": 1, "seq": 1, "links": [link(C)]})   # nobody asked
    await s.on_message(B, S.SUMMARY, "garbage")
    assert s.drops == {"not_member": 1, "malformed": 2, "unsolicited": 1}
    net.members = {f"{i:032x}" for i in range(S.MAX_SUBSCRIBERS + 3)}
    for m in sorted(net.members):
        await s.on_message(m, S.SUBSCRIBE, {"lease": 10})
    assert len(s.subscribers) == S.MAX_SUBSCRIBERS and s.drops["too_many_subscribers"] == 3
    await s.stop()


@arun
async def test_viewer_subscribes_keeps_and_cancels(monkeypatch):
    now = [0.0]
    net = Net({B, C})
    s = S.LinkSummaries(A, net.hooks(), clock=lambda: now[0])
    s.watch()
    await asyncio.sleep(0.05)
    asked = sorted(p for p, t, body in net.out if t == S.SUBSCRIBE and body["lease"] == S.LEASE)
    assert asked == [B, C]
    await s.on_message(B, S.SUMMARY, S.summary_payload(1, [S.parse_link(link(A))]))
    assert s.view()["summaries"][B]["links"][0]["peer"] == A
    net.members.discard(B)                                       # a member left: its summary goes
    now[0] += S.WATCH_IDLE + 1                                   # the page closed
    await asyncio.sleep(1.2)
    assert (C, S.SUBSCRIBE, {"lease": 0}) in net.out and s.view()["summaries"] == {}
    await s.stop()


# -- the graph model ------------------------------------------------------------------------------
def view(summaries: dict, **kw) -> dict:
    me = {"node_id": A, "name": "alpha", "addresses": ["100.99.0.1"], "guests": [{"name": "g1", "addresses": ["100.99.11.1"]}]}
    members = [{"node_id": n, "name": name, "addresses": [], "guests": []} for n, name in ((B, "bravo"), (C, "charlie"), (D, "delta"))]
    peers = [{"node_id": n, "state": "up", "path": "direct", "rtt_ms": 1.0, "candidates": "host->host", "drops": {"x": 1},
              "last_handshake_s": 2.0, "uptime_s": 9.0, "role": "all-to-all", "local_addr": "l", "remote_addr": "r",
              "tx_bytes": 5, "rx_bytes": 6} for n in (B, C, D)]
    return {"overlay": "demo", "me": me, "members": members, "peers": peers, "own": [], "summaries": summaries,
            "lsa_edges": [], "asked": {}, **kw}


def test_graph_of_four_nodes_six_links_one_relayed():
    sums = {B: {"age_s": 1.0, "more": 0, "links": [link(A), link(C, path="relay", tx_bps=4e6), link(D)]},
            C: {"age_s": 1.5, "more": 0, "links": [link(A), link(B, path="relay", tx_bps=1e6), link(D, role="on-demand")]},
            D: {"age_s": 0.5, "more": 0, "links": [link(A), link(B), link(C)]}}
    g = build_graph(view(sums))
    assert g["counts"] == {"nodes": 4, "links": 6, "down": 0, "relayed": 1}
    by = {frozenset((l["a"], l["b"])): l for l in g["links"]}
    bc = by[frozenset((B, C))]
    assert bc["path"] == "relay" and bc["a_to_b_bps"] == 4e6 and bc["b_to_a_bps"] == 1e6
    assert by[frozenset((C, D))]["on_demand"]
    ab = by[frozenset((A, B))]
    assert ab["mine"] and ab["ends"]["a"]["cand"] == "host->host" and ab["ends"]["a"]["drops"] == {"x": 1}
    nodes = {n["id"]: n for n in g["nodes"]}
    assert nodes[A]["state"] == "self" and nodes[A]["guests"][0]["name"] == "g1" and nodes[A]["links"] == 3


def test_a_silent_node_is_marked_down_with_its_links():
    sums = {B: {"age_s": 1.0, "more": 0, "links": [link(A), link(C)]},
            C: {"age_s": 9.0, "more": 0, "links": [link(A), link(B)]}}
    g = build_graph(view(sums))
    nodes = {n["id"]: n["state"] for n in g["nodes"]}
    assert nodes[C] == "down" and nodes[B] == "up" and nodes[D] == "waiting"
    assert all(l["state"] == "down" for l in g["links"] if C in (l["a"], l["b"]))
    assert g["counts"]["down"] == 1


def test_lsa_edges_fill_in_before_summaries_arrive():
    g = build_graph(view({}, lsa_edges=[(B, C), (C, B), (B, "e" * 32)]))
    bc = [l for l in g["links"] if {l["a"], l["b"]} == {B, C}]
    assert len(bc) == 1 and bc[0]["path"] == "unknown" and bc[0]["source"] == "lsa"
    assert g["counts"]["links"] == 4                              # 3 of ours + B-C; the non-member's edge is left out


# -- the server -------------------------------------------------------------------------------------
class Source:
    def __init__(self):
        self.watched = 0
        self.g = build_graph(view({}))

    def overlays(self):
        return ["demo"]

    def graph(self, overlay):
        return self.g

    def watch(self, overlay):
        self.watched += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, host: str | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@arun
async def test_server_page_graph_events_and_guards():
    src = Source()
    port = free_port()
    srv = WebServer(("127.0.0.1", port), src).bind()
    await srv.start()
    base = f"http://127.0.0.1:{port}"
    try:
        st, hdr, body = await asyncio.to_thread(get, base + "/")
        assert st == 200 and b"/assets/app.js" in body and "default-src 'self'" in hdr["Content-Security-Policy"]
        for asset in ("app.js", "style.css"):
            st, _, body = await asyncio.to_thread(get, f"{base}/assets/{asset}")
            assert st == 200 and body
        # nothing on the page comes from elsewhere: no absolute URL but the SVG namespace's name
        for path in ("/", "/assets/app.js", "/assets/style.css"):
            text = (await asyncio.to_thread(get, base + path))[2].replace(b"http://www.w3.org/2000/svg", b"")
            assert b"http" not in text and b"//" not in text.replace(b"// ", b"").replace(b"//\n", b""), path
        st, _, body = await asyncio.to_thread(get, base + "/api/graph")
        assert st == 200 and json.loads(body)["counts"]["links"] == 3 and src.watched == 1
        assert (await asyncio.to_thread(get, base + "/api/graph?overlay=nope"))[0] == 404
        assert (await asyncio.to_thread(get, base + "/assets/../server.py"))[0] == 404
        assert (await asyncio.to_thread(get, base + "/api/graph", method="POST"))[0] == 405     # read-only
        assert (await asyncio.to_thread(get, base + "/", host="evil.example:80"))[0] == 421     # DNS rebinding
        assert (await asyncio.to_thread(get, base + "/", host=f"localhost:{port}"))[0] == 200
        # the event stream: the graph at once
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        await w.drain()
        data = b""
        while b"\n\n" not in data.split(b"\r\n\r\n", 1)[-1] or b"data:" not in data:
            data += await asyncio.wait_for(r.read(4096), 5)
        assert b"text/event-stream" in data and b"event: graph" in data
        assert srv.status()["streams"] == 1
        w.close()
    finally:
        await srv.stop()


def test_busy_port_is_one_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(IpopError, match=rf"node.web: cannot listen on 127.0.0.1:{port}: Address already in use"):
            WebServer(("127.0.0.1", port), Source()).bind()


def node_config(tmp_path, listen: str) -> os.PathLike:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"""
[node]
identity_dir = "{tmp_path}/id"
state_dir = "{tmp_path}/state"
metrics = ""

[node.web]
enable = true
listen = "{listen}"

[[overlay]]
name = "demo"
address = "100.99.0.1/16"
xmpp = {{ server = "198.18.0.1", jid = "a@example.org", password = "x" }}
""")
    return cfg


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999", "localhost:80", "::1"])
def test_invalid_listen_is_one_config_error(tmp_path, listen):
    with pytest.raises(ConfigError) as e:
        load_config(node_config(tmp_path, listen))
    msg = str(e.value)
    assert "node.web.listen" in msg and "\n" not in msg


def test_up_with_busy_web_port_says_so_in_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        cfg = node_config(tmp_path, f"127.0.0.1:{port}")
        r = subprocess.run([sys.executable, "-m", "ipop_switch.cli", "up", "-c", str(cfg)], capture_output=True,
                           text=True, timeout=60)
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if "node.web" in l]
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in lines[0], r.stderr


def test_a_viewer_of_a_large_overlay_asks_at_most_max_view_members():
    members = {f"{i:032x}" for i in range(1, 200)}
    s = S.LinkSummaries(A, Net(members).hooks())
    s.own = [S.parse_link(link(f"{i:032x}")) for i in (150, 199)]        # our neighbours
    t = s.targets(members)
    assert len(t) == S.MAX_VIEW and t[:2] == [f"{150:032x}", f"{199:032x}"]
    assert s.targets({B, C}) == [B, C]
