"""Regression tests (unit, no OVS) for the switch app's security review findings:
11: a malformed SYN never makes ``clamp_mss`` raise; 5: the MAC table is capped per
port and in total, flow-removed finds its flow by cookie without scanning; 3: the app
refuses every datapath but the one the agent named.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from ryu_apps import packets

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


# -- finding 11: clamp_mss on malformed SYNs -------------------------------------------
def _syn4() -> bytes:
    return bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="100.96.0.1", dst="100.96.0.2")
                 / TCP(flags="S", options=[("NOP", None), ("MSS", 1460), ("WScale", 7)]))


def test_ipv4_total_length_below_header_length_is_not_clamped():
    """The review's trigger: IPv4 total length < header length (struct.error before the fix)."""
    b = bytearray(_syn4())
    for tot in (0, 1, 19, 20, 39):
        struct.pack_into("!H", b, 14 + 2, tot)
        assert packets.clamp_mss(packets.parse(bytes(b)), 1360, 1340) is None


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ver_ihl=st.integers(0, 255), tot=st.integers(0, 0xFFFF), proto=st.sampled_from([6, 6, 6, 17]),
       doff=st.integers(0, 15), flags=st.integers(0, 255), opts=st.binary(max_size=44),
       tail=st.binary(max_size=64), cut=st.integers(0, 200))
def test_clamp_mss_never_raises_on_malformed_ipv4_syns(ver_ihl, tot, proto, doff, flags, opts, tail, cut):
    b = bytearray(_syn4())
    b[14] = ver_ihl
    struct.pack_into("!H", b, 16, tot)
    b[14 + 9] = proto
    l4 = 14 + 20
    b[l4 + 12] = doff << 4
    b[l4 + 13] = flags
    data = bytes(b[: l4 + 20]) + opts + tail
    data = data[: max(14, len(data) - cut)]
    out = packets.clamp_mss(packets.parse(data), 1360, 1340)
    assert out is None or (isinstance(out[0], bytes) and out[1] > 1360)


@settings(max_examples=2000, deadline=None)
@given(plen=st.integers(0, 0xFFFF), nxt=st.sampled_from([6, 6, 0, 58]), doff=st.integers(0, 15),
       flags=st.integers(0, 255), opts=st.binary(max_size=44), cut=st.integers(0, 120))
def test_clamp_mss_never_raises_on_malformed_ipv6_syns(plen, nxt, doff, flags, opts, cut):
    b = bytearray(bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src="fd00::1", dst="fd00::2")
                        / TCP(flags="S", options=[("MSS", 1460)])))
    struct.pack_into("!H", b, 14 + 4, plen)
    b[14 + 6] = nxt
    l4 = 14 + 40
    b[l4 + 12] = doff << 4
    b[l4 + 13] = flags
    data = bytes(b[: l4 + 20]) + opts
    data = data[: max(14, len(data) - cut)]
    out = packets.clamp_mss(packets.parse(data), 1360, 1340)
    assert out is None or out[1] > 1340


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=14, max_size=200))
def test_every_parser_takes_any_bytes(data):
    """What the app does with a packet-in's bytes: BadFrame is the only exception allowed."""
    try:
        f = packets.parse(data)
    except packets.BadFrame:
        return
    packets.parse_arp(f)
    packets.parse_nd(f)
    packets.clamp_mss(f, 1360, 1340)


# -- finding 5: bounded MAC table, flows indexed by cookie -------------------------------
from ryu_apps.tables import FlowRec, FlowTable, MacEntry, MacTable  # noqa: E402


def test_mac_table_caps_per_port_and_in_total():
    t = MacTable(max_total=10, max_per_port=4)
    mac = lambda i: bytes([2, 0, 0, 0, i >> 8, i & 0xFF])  # noqa: E731
    assert [t.add(mac(i), MacEntry(port=1, owner=None)) for i in range(6)] == [True] * 4 + [False] * 2
    assert t.on_port(1) == 4 and len(t) == 4
    assert sum(t.add(mac(100 + i), MacEntry(port=2 + i % 3, owner=None)) for i in range(20)) == 6
    assert len(t) == 10 and not t.room(9)  # total reached: no port has room
    e = t.get(mac(0))
    t.set_port(e, 9)  # a move is not refused...
    assert t.on_port(1) == 3 and t.on_port(9) == 1 and len(t) == 10  # ...and is counted where it went
    t.remove(mac(1))
    assert t.room(1) and t.add(mac(1), MacEntry(port=1, owner=None))
    with pytest.raises(KeyError):
        t.add(mac(1), MacEntry(port=1, owner=None))


class _NoScan(dict):
    """A dict that fails the test if anything walks it."""

    def _scan(self, *a):
        raise AssertionError("the flow table was scanned")

    __iter__ = items = values = keys = _scan


def test_flow_removed_lookup_is_by_cookie_not_a_scan():
    t = FlowTable()
    for i in range(1000):
        t.put((0, 100, (("eth_src", i),)), FlowRec(cookie=(7 << 48) | i, table=0, priority=100, match={}, actions=""))
    t._by_key, t._by_cookie = _NoScan(t._by_key), _NoScan(t._by_cookie)
    rec = t.pop_cookie((7 << 48) | 500)
    assert rec is not None and rec.cookie == (7 << 48) | 500
    assert t.pop_cookie((7 << 48) | 500) is None and t.pop_cookie(12345) is None
    assert len(t) == 999


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "pop", "pop_cookie"]), st.integers(0, 15), st.integers(1, 40)),
                max_size=120))
def test_flow_table_cookie_index_stays_exact(ops):
    """Whatever the order of adds, re-adds under a new cookie and removals, the index is exact."""
    t, model = FlowTable(), {}
    for op, k, cookie in ops:
        key = (0, 1, ((k,),))
        if op == "put" and not any(r.cookie == cookie for kk, r in model.items() if kk != key):
            rec = FlowRec(cookie=cookie, table=0, priority=1, match={}, actions="")
            t.put(key, rec)
            model[key] = rec
        elif op == "pop":
            assert t.pop(key) is model.pop(key, None)
        elif op == "pop_cookie":
            hit = next((kk for kk, r in model.items() if r.cookie == cookie), None)
            assert t.pop_cookie(cookie) is (model.pop(hit) if hit is not None else None)
        assert dict(t._by_key) == model
        assert t._by_cookie == {r.cookie: kk for kk, r in model.items()}


# -- finding 3: the app refuses any datapath it was not told about ------------------------
def _of_msg(typ: int, xid: int, body: bytes = b"") -> bytes:
    return struct.pack("!BBHI", 4, typ, 8 + len(body), xid) + body


def fake_switch(path: str, dpid: int, timeout: float = 10.0) -> bool:
    """Speak OpenFlow 1.3 as a switch with ``dpid``: HELLO, answer FEATURES_REQUEST (and echoes).
    True if the controller then closes the connection (refused), False if it keeps it."""
    import socket as so
    import time

    s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    s.connect(path)
    s.settimeout(0.5)
    s.sendall(_of_msg(0, 1))
    buf, answered, deadline = b"", None, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except so.timeout:
                if answered is not None and time.monotonic() - answered > 3:
                    return False  # still open 3 s after the features reply: adopted
                continue
            except ConnectionResetError:
                return True
            if not chunk:
                return True
            buf += chunk
            while len(buf) >= 8:
                _, typ, length, xid = struct.unpack_from("!BBHI", buf)
                if len(buf) < length:
                    break
                buf = buf[length:]
                if typ == 5:  # FEATURES_REQUEST
                    s.sendall(_of_msg(6, xid, struct.pack("!QIBB2xII", dpid, 0, 254, 0, 0, 0)))
                    answered = time.monotonic()
                elif typ == 2:  # ECHO_REQUEST
                    s.sendall(_of_msg(3, xid))
        raise AssertionError("no FEATURES_REQUEST from the controller")
    finally:
        s.close()


def test_app_refuses_datapaths_until_told_and_then_all_but_the_named_one(tmp_path):
    import json
    import socket as so
    import subprocess
    import sys
    import time

    chan, ofp = tmp_path / "app.sock", tmp_path / "ofp.sock"
    p = subprocess.Popen([sys.executable, "-m", "ryu_apps.launch", "--channel", str(chan), "--ofp-socket", str(ofp)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not (chan.exists() and ofp.exists()):
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert ofp.stat().st_mode & 0o777 == 0o600
        c = so.socket(so.AF_UNIX)
        c.connect(str(chan))
        f = c.makefile("rwb")

        def call(msg: dict) -> dict:
            f.write(json.dumps(msg).encode() + b"\n")
            f.flush()
            return json.loads(f.readline())

        assert fake_switch(str(ofp), 0x1111)  # no datapath named yet: refused
        assert call({"op": "set_datapath", "dpid": 0x2222})["ok"]
        assert fake_switch(str(ofp), 0x1111)  # not the one named: refused
        assert call({"op": "counters"})["counters"]["datapaths_refused"] == 2
        assert not fake_switch(str(ofp), 0x2222)  # the named one is kept
        assert call({"op": "status"})["dpid"] == 0x2222
        c.close()
    finally:
        p.terminate()
        p.wait(timeout=5)
