"""The switch app's frame code (checked against scapy) and its channel's handling of bad input."""

from __future__ import annotations

import json
import socket

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from ipop_switch.bridge import switch_channel as ch
from ryu_apps import packets

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def test_mss_clamp_v4_and_v6_with_valid_checksums():
    for ip, limit in ((IP(src="100.96.0.1", dst="100.96.0.2"), 1360), (IPv6(src="fd00:96::1", dst="fd00:96::2"), 1340)):
        syn = Ether(src=MAC_A, dst=MAC_B) / ip / TCP(flags="S", options=[("NOP", None), ("MSS", 1460), ("WScale", 7)])
        raw = bytes(syn)
        out = packets.clamp_mss(packets.parse(raw), 1360, 1340)
        assert out is not None and out[1] == 1460
        got = Ether(out[0])
        assert dict((k, v) for k, v in got[TCP].options if k == "MSS")["MSS"] == limit
        chk = got[TCP].chksum
        del got[TCP].chksum
        assert Ether(bytes(got))[TCP].chksum == chk  # scapy recomputes the same checksum
    # an MSS within the limit stays, but a partial (pseudo-header only) checksum, as a host with
    # checksum offload hands it over, leaves the app whole: the frame goes on from there
    small = Ether() / IP(src="100.96.0.1", dst="100.96.0.2") / TCP(flags="S", options=[("MSS", 1200)], chksum=0x1234)
    out = packets.clamp_mss(packets.parse(bytes(small)), 1360, 1340)
    assert out is not None and out[1] == 1200
    got = Ether(out[0])
    assert dict((k, v) for k, v in got[TCP].options if k == "MSS")["MSS"] == 1200
    chk = got[TCP].chksum
    del got[TCP].chksum
    assert Ether(bytes(got))[TCP].chksum == chk != 0x1234
    ack = Ether() / IP() / TCP(flags="A")
    assert packets.clamp_mss(packets.parse(bytes(ack)), 1360, 1340) is None


def test_arp_reply_and_neighbour_advert_are_well_formed():
    req = Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=MAC_A, psrc="100.96.0.1", pdst="100.96.0.2")
    a = packets.parse_arp(packets.parse(bytes(req)))
    rep = Ether(packets.arp_reply(a, packets.mac_bytes(MAC_B)))
    assert rep.dst == MAC_A and rep[ARP].op == 2 and rep[ARP].hwsrc == MAC_B and rep[ARP].psrc == "100.96.0.2"
    ns = (Ether(src=MAC_A, dst="33:33:ff:00:00:02") / IPv6(src="fd00:96::1", dst="ff02::1:ff00:2")
          / ICMPv6ND_NS(tgt="fd00:96::2") / ICMPv6NDOptSrcLLAddr(lladdr=MAC_A))
    nd = packets.parse_nd(packets.parse(bytes(ns)))
    assert nd.target == "fd00:96::2" and nd.lladdr == packets.mac_bytes(MAC_A)
    na = Ether(packets.neighbour_advert(nd, packets.mac_bytes(MAC_B)))
    assert na.dst == MAC_A and na[IPv6].hlim == 255 and na[ICMPv6ND_NA].S == 1 and na[ICMPv6ND_NA].O == 1
    assert na[ICMPv6NDOptDstLLAddr].lladdr == MAC_B
    chk = na[ICMPv6ND_NA].cksum
    del na[ICMPv6ND_NA].cksum
    assert Ether(bytes(na))[ICMPv6ND_NA].cksum == chk


def test_bad_frames_are_errors_not_crashes():
    for bad in (b"", b"\x00" * 13, b"\x00" * 12 + b"\x81\x00\x00"):
        with pytest.raises(packets.BadFrame):
            packets.parse(bad)
    f = packets.parse(b"\x00" * 12 + b"\x08\x06" + b"\x00" * 5)  # truncated ARP
    assert packets.parse_arp(f) is None


@pytest.mark.parametrize("line,err", [
    (b"not json", "not JSON"),
    (b'{"op": "nope"}', "bad request"),
    (b'{"op": "add_peer_port", "port": "p1", "peer": "XYZ"}', "32 lowercase hex"),
    (b'{"op": "add_peer_port", "port": "a name too long for linux", "peer": "' + b"a" * 32 + b'"}', "bad port name"),
    (b'{"op": "set_mtu", "mtu": -1}', "bad request"),
])
def test_channel_rejects_bad_requests_with_one_line(line, err):
    with pytest.raises(ch.ChannelError, match=err):
        ch.parse_request(line)


def test_app_channel_answers_bad_input_and_keeps_serving(tmp_path):
    """The app process itself (no switch connected): bad lines get an error reply, the channel stays up."""
    import subprocess
    import sys
    import time

    sock_path = tmp_path / "app.sock"
    p = subprocess.Popen([sys.executable, "-m", "ryu_apps.launch", "--channel", str(sock_path),
                          "--ofp-socket", str(tmp_path / "ofp.sock")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock_path.exists():
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock_path))
        f = s.makefile("rwb")
        for line, ok in ((b"garbage\n", False), (b'{"op":"set_node_id","node_id":"' + b"a" * 32 + b'"}\n', True),
                         (b'{"op":"status"}\n', True)):
            f.write(line)
            f.flush()
            reply = json.loads(f.readline())
            assert reply["ok"] is ok, reply
        assert reply["node_id"] == "a" * 32 and reply["connected"] is False
        s.close()
    finally:
        p.terminate()
        p.wait(timeout=5)
