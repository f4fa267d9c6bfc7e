"""The name table and the DNS responder without the lab: names from members (conflicts,
guests, addresses outside the overlay), every reply kind over a real UDP socket on a
127/8 address (found, NODATA, NXDOMAIN, REFUSED, forwarded), malformed datagrams counted
and dropped while the responder keeps answering, bind errors as one line, the config."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest
from dnslib import QTYPE, RCODE, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from ipop_switch.config import Config, ConfigError, DnsConfig, dns_loopback
from ipop_switch import hostport
from ipop_switch.errors import IpopError
from ipop_switch.naming.dns import FORWARD, DnsResponder, query
from ipop_switch.naming.names import Member, NameTable, caps_of, dns_label, member_from_caps

ZONE = "demo.ipsw.internal"
A_ID, B_ID, C_ID = "a" * 32, "b" * 32, "c" * 32
NETS = [ipaddress.ip_network("100.99.0.0/16"), ipaddress.ip_network("fd00:99::/64")]


def members() -> list[Member]:
    return [
        Member(A_ID, "alpha", ("100.99.0.1",), ("fd00:99::1",), (("web", ("100.99.1.5", "fd00:99::15")),)),
        Member(B_ID, "beta", ("100.99.0.2",), ()),
        Member(C_ID, "alpha", ("100.99.0.3",), ()),                 # claims a taken name
    ]


def table() -> NameTable:
    return NameTable(ZONE, members(), networks=NETS, trusted=A_ID)


# -- the table -------------------------------------------------------------------------
def test_labels():
    assert dns_label("Alice's Laptop") == "alice-s-laptop"
    assert dns_label("h1") == "h1"
    assert dns_label("---") is None
    assert len(dns_label("x" * 100)) == 63


def test_table_names_guests_conflicts():
    t = table()
    assert t.lookup("alpha.demo.ipsw.internal.").a == ["100.99.0.1"]
    assert t.lookup("ALPHA.Demo.ipsw.internal").aaaa == ["fd00:99::1"]
    assert t.lookup(f"{A_ID}.{ZONE}").a == ["100.99.0.1"]
    assert t.lookup(f"web.alpha.{ZONE}").a == ["100.99.1.5"]
    assert t.lookup(f"web.alpha.{ZONE}").aaaa == ["fd00:99::15"]
    assert t.lookup(f"beta.{ZONE}").aaaa == []
    # the lower node id keeps a name claimed twice; the other stays reachable by its id
    assert t.conflicts == ["alpha"]
    assert t.lookup(f"{C_ID}.{ZONE}").a == ["100.99.0.3"]
    assert t.lookup(f"gamma.{ZONE}").kind == "nxdomain"
    assert t.lookup(ZONE).kind == "found"
    assert t.lookup("example.com").kind == "outside"
    assert t.lookup("xdemo.ipsw.internal").kind == "outside"


def test_remote_addresses_outside_the_overlay_are_not_published():
    m = Member(B_ID, "evil", ("198.18.0.1", "100.99.0.9"), ("fd00:1::1",))
    t = NameTable(ZONE, [m], networks=NETS, trusted=A_ID)
    assert t.lookup(f"evil.{ZONE}").a == ["100.99.0.9"]
    assert t.lookup(f"evil.{ZONE}").aaaa == []
    assert t.ignored == 2


def test_caps_round_trip_and_bad_caps():
    caps = caps_of(None, "100.99.0.2/16", "fd00:99::2/64", [("Web_1", ["100.99.1.7/16"]), ("none", [])])
    m = member_from_caps(B_ID, "Beta Host", caps)
    assert m.name == "beta-host" and m.a == ("100.99.0.2",) and m.aaaa == ("fd00:99::2",)
    assert m.guests == (("web-1", ("100.99.1.7",)),)
    assert member_from_caps(B_ID, "b", caps_of("bee", "100.99.0.2/16", None, [])).name == "bee"
    # whatever a peer announces, a Member comes out (possibly empty), never an exception
    for bad in (None, [], {"dns": 5}, {"dns": {"a": "x", "aaaa": [1, None], "guests": {"g": "x", 3: []}}},
                {"dns": {"name": 7, "a": ["999.1.1.1", "100.99.0.5"]}}):
        m = member_from_caps(B_ID, "b", bad)
        assert m.node_id == B_ID
    assert member_from_caps(B_ID, "b", {"dns": {"a": ["999.1.1.1", "100.99.0.5"]}}).a == ("100.99.0.5",)


@settings(max_examples=200)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=20))
def test_any_caps_give_a_member(caps):
    m = member_from_caps(B_ID, "b", {"dns": caps})
    NameTable(ZONE, [m], networks=NETS)


# -- packets ---------------------------------------------------------------------------
def responder(**kw) -> DnsResponder:
    return DnsResponder(table, listen=[], **kw)


def ask(r: DnsResponder, name: str, qtype: str = "A") -> DNSRecord:
    out = r.respond(DNSRecord.question(name, qtype).pack())
    assert isinstance(out, bytes)
    return DNSRecord.parse(out)


def test_answers():
    r = responder()
    a = ask(r, f"alpha.{ZONE}")
    assert a.header.rcode == RCODE.NOERROR and a.header.aa
    assert [str(x.rdata) for x in a.rr] == ["100.99.0.1"] and a.rr[0].ttl == 60
    assert [str(x.rdata) for x in ask(r, f"alpha.{ZONE}", "AAAA").rr] == ["fd00:99::1"]
    assert len(ask(r, f"web.alpha.{ZONE}", "ANY").rr) == 2
    nodata = ask(r, f"beta.{ZONE}", "AAAA")
    assert nodata.header.rcode == RCODE.NOERROR and not nodata.rr and nodata.auth[0].rtype == QTYPE.SOA
    nx = ask(r, f"nobody.{ZONE}")
    assert nx.header.rcode == RCODE.NXDOMAIN and nx.auth[0].rtype == QTYPE.SOA
    soa = ask(r, ZONE, "SOA")
    assert soa.rr[0].rtype == QTYPE.SOA
    ref = ask(r, "example.com")
    assert ref.header.rcode == RCODE.REFUSED and not ref.rr
    assert r.counts["answers"] == 4 and r.counts["nxdomain"] == 1 and r.counts["refused"] == 1
    assert r.counts["nodata"] == 1


def test_forward_marker_only_outside_the_zone():
    r = responder(forward=[("127.0.0.1", 5)])
    assert r.respond(DNSRecord.question("example.com").pack()) is FORWARD
    assert ask(r, f"nobody.{ZONE}").header.rcode == RCODE.NXDOMAIN


def test_not_queries_are_dropped_and_counted():
    r = responder()
    assert r.respond(b"") is None
    assert r.respond(b"\x00" * 5) is None
    assert r.respond(b"\xff" * 600) is None
    assert r.respond(b"x" * 5000) is None
    reply = ask(r, f"alpha.{ZONE}").pack()
    assert r.respond(reply) is None                    # a response is never answered
    assert r.drops["malformed"] >= 2 and r.drops["too_large"] == 1 and r.drops["not_query"] == 1
    # errors the header allows: not a query opcode, two questions
    q = DNSRecord.question(f"alpha.{ZONE}")
    q.header.opcode = 2
    assert DNSRecord.parse(r.respond(q.pack())).header.rcode == RCODE.NOTIMP
    q = DNSRecord.question(f"alpha.{ZONE}")
    q.add_question(*DNSRecord.question(f"beta.{ZONE}").questions)
    assert DNSRecord.parse(r.respond(q.pack())).header.rcode == RCODE.FORMERR


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_any_datagram_is_answered_or_counted(data):
    r = responder()
    out = r.respond(data)
    assert out is None and sum(r.drops.values()) == 1 or isinstance(out, bytes)


# -- over real sockets -------------------------------------------------------------------
def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_udp_answers_and_survives_garbage():
    async def main():
        host = "127.53.0.7"
        port = free_port(host)
        r = DnsResponder(table, listen=[(host, port)])
        await r.start()
        try:
            a = await query(host, port, f"beta.{ZONE}")
            assert [str(x.rdata) for x in a.rr] == ["100.99.0.2"]
            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"\x12\x34garbage", (host, port))
                s.sendto(b"", (host, port))
            nx = await query(host, port, f"nobody.{ZONE}")
            assert nx.header.rcode == RCODE.NXDOMAIN
            await asyncio.wait_for(_until(lambda: r.drops["malformed"] >= 1), 2)
            st_ = r.status()
            assert st_["drops"]["malformed"] >= 1 and st_["queries"] == 2 and st_["zone"] == ZONE
            del loop
        finally:
            await r.stop()
    asyncio.run(main())


async def _until(pred) -> None:
    while not pred():
        await asyncio.sleep(0.02)


def test_forwarding_to_an_upstream_and_a_dead_one():
    async def main():
        up_host, host = "127.53.0.8", "127.53.0.9"
        up_port, port = free_port(up_host), free_port(host)
        other = NameTable("example.com", [Member(B_ID, "www", ("100.99.0.77",))])
        upstream = DnsResponder(lambda: other, listen=[(up_host, up_port)])
        await upstream.start()
        dead = free_port("127.53.0.10")
        r = DnsResponder(table, listen=[(host, port)], forward=[("127.53.0.10", dead), (up_host, up_port)])
        await r.start()
        try:
            a = await query(host, port, "www.example.com", timeout=6)
            assert [str(x.rdata) for x in a.rr] == ["100.99.0.77"]
            assert r.counts["forwarded"] == 1
            # only the dead upstream: SERVFAIL after its timeout, counted
            r.forward = [("127.53.0.10", dead)]
            f = await query(host, port, "www.example.com", timeout=6)
            assert f.header.rcode == RCODE.SERVFAIL and r.drops["forward_failed"] == 1
        finally:
            await r.stop()
            await upstream.stop()
    asyncio.run(main())


def test_port_in_use_is_one_line():
    async def main():
        host = "127.53.0.11"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
            r = DnsResponder(table, listen=[("127.53.0.12", free_port("127.53.0.12")), (host, port)])
            with pytest.raises(IpopError, match=r"dns: cannot listen on 127\.53\.0\.11:\d+: Address already in use"):
                await r.start()
            assert not r._transports          # the first one was closed again
    asyncio.run(main())


# -- config ------------------------------------------------------------------------------
def _cfg(**dns) -> dict:
    ov = {"name": "demo", "address": "100.99.0.1/16",
          "xmpp": {"server": "198.18.0.1", "jid": "a@x", "password": "p"}, "dns": {"enable": True, **dns}}
    return {"overlay": [ov]}


def test_config():
    c = Config.parse(_cfg())
    assert c.overlay[0].dns.suffix == "ipsw.internal" and c.overlay[0].dns.port == 53
    assert Config.parse({"overlay": [{**_cfg()["overlay"][0]}]}).overlay[0].dns.listen == ["overlay", "loopback"]
    assert Config.parse({"overlay": [{k: v for k, v in _cfg()["overlay"][0].items() if k != "dns"}]}
                                 ).overlay[0].dns.enable is False
    for bad in ({"port": 0}, {"port": 70000}, {"suffix": "bad_name"}, {"listen": ["eth0"]}, {"listen": []},
                {"loopback": "100.99.0.1"}, {"forward": ["dns.google"]}, {"forward": ["1.1.1.1:99999"]},
                {"name": "Bad Name"}, {"colour": 1}):
        with pytest.raises(ConfigError):
            Config.parse(_cfg(**bad))
    assert dns_loopback("demo") != dns_loopback("other")
    assert dns_loopback("demo").startswith("127.53.")
    assert hostport.split("[fd00::53]:5353", 53, ip=True) == ("fd00::53", 5353)
    assert DnsConfig(forward=["198.18.0.53"]).forward_addrs() == [("198.18.0.53", 53)]


def test_config_error_names_the_field(tmp_path):
    from ipop_switch.config import load_config
    p = tmp_path / "node.toml"
    p.write_text('[[overlay]]\nname = "demo"\naddress = "100.99.0.1/16"\n'
                 '[overlay.xmpp]\nserver = "198.18.0.1"\njid = "a@x"\npassword = "p"\n'
                 '[overlay.dns]\nenable = true\nport = 0\n')
    with pytest.raises(ConfigError, match=r"overlay\[0\]\.dns\.port: expected int >= 1"):
        load_config(p)


def test_two_overlays_on_one_loopback_are_refused():
    one = _cfg(loopback="127.53.1.1")["overlay"][0]
    two = {**one, "name": "other", "address": "100.98.0.1/16"}
    with pytest.raises(ConfigError, match="127.53.1.1:53"):
        Config.parse({"overlay": [one, two]})


# -- status and metrics ------------------------------------------------------------------
def test_status_line_and_metrics_show_the_responder():
    from io import StringIO

    from rich.console import Console

    from ipop_switch.agent.metrics import StatusCollector
    from ipop_switch.render import render_status
    r = responder()
    ask(r, f"alpha.{ZONE}")
    ask(r, f"nobody.{ZONE}")
    r.respond(b"junk")
    st = {"node": {"node_id": "ab" * 16}, "overlays": [{
        "name": "demo", "bridge": "ipswdemo", "address": "100.99.0.1/16", "signaling": {}, "peers": [],
        "dns": r.status()}]}
    c = Console(file=StringIO(), width=250)
    render_status(st, c)
    line = next(l for l in c.file.getvalue().splitlines() if "dns:" in l)
    for want in (ZONE, "1 answered", "1 NXDOMAIN", "dropped: malformed 1", "names claimed twice: alpha"):
        assert want in line, (want, line)
    fams = {f.name: f for f in StatusCollector(lambda: st).collect()}
    q = {s.labels["kind"]: s.value for s in fams["ipsw_dns_queries"].samples if s.name.endswith("_total")}
    d = {s.labels["reason"]: s.value for s in fams["ipsw_dns_drops"].samples if s.name.endswith("_total")}
    assert q["answers"] == 1 and q["nxdomain"] == 1 and d == {"malformed": 1}
