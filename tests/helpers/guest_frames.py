"""Hand-made frames for the guest tests (raw AF_PACKET, no scapy: started and timed in ms).

    send  --iface IF --kind KIND --src MAC [--ip IP] [--dst-mac MAC] [--dst-ip IP] [--count N]
          one frame (or N) of KIND: garp (gratuitous ARP), unicast (UDP to dst-mac/dst-ip port 9),
          dhcp4-offer (UDP 67 -> 68, broadcast), dhcp6-adv (UDP 547 -> 546 to ff02::1:2),
          ra (ICMPv6 134 to ff02::1), spoof (a broadcast from --src, whatever the port's MAC is)
    count --iface IF --kind KIND[,KIND...] --seconds S
          frames of each KIND (dhcp4-offer, dhcp6-adv, ra, spoof = ethertype 0x88b5) received; prints
          "ready" once listening, then JSON {kind: count}
    move  --iface IF --kind garp|unicast --src MAC --ip IP [--dst-mac --dst-ip] [--timeout S]
          a moved guest's first frame, then the wait for the first ICMP echo request to --ip;
          prints JSON {"sent": t, "first_echo": t|null} (time.monotonic(), one clock for all namespaces)
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import struct
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
BCAST = b"\xff" * 6


def mac(s: str) -> bytes:
    return bytes(int(x, 16) for x in s.split(":"))


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                    ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return h[:10] + struct.pack("!H", csum(h)) + h[12:] + payload


def udp4(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    u = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    return ip4(src, dst, 17, u)  # checksum 0: allowed for UDP over IPv4


def ip6(src: str, dst: str, nh: int, payload: bytes) -> bytes:
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    if nh in (17, 58):  # both need their checksum over the pseudo header
        off = 6 if nh == 17 else 2
        pseudo = s + d + struct.pack("!I3xB", len(payload), nh)
        payload = payload[:off] + b"\0\0" + payload[off + 2 :]
        payload = payload[:off] + struct.pack("!H", csum(pseudo + payload)) + payload[off + 2 :]
    return struct.pack("!IHBB", 0x60000000, len(payload), nh, 255) + s + d + payload


def frame(a: argparse.Namespace) -> bytes:
    src = mac(a.src)
    if a.kind == "garp":
        ipb = ipaddress.IPv4Address(a.ip).packed
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src + ipb + b"\0" * 6 + ipb
        return BCAST + src + b"\x08\x06" + arp + b"\0" * 18
    if a.kind == "unicast":
        return mac(a.dst_mac) + src + b"\x08\x00" + udp4(a.ip, a.dst_ip, 40000, 9, b"moved")
    if a.kind == "dhcp4-offer":
        bootp = struct.pack("!BBBBI", 2, 1, 6, 0, 0x1234) + b"\0" * 8 + b"\0" * 4
        bootp += ipaddress.IPv4Address("100.96.99.99").packed + b"\0" * 8 + b"\0" * 16 + b"\0" * 192
        bootp += b"\x63\x82\x53\x63" + b"\x35\x01\x02\xff"  # DHCP message type OFFER
        return BCAST + src + b"\x08\x00" + udp4("100.96.99.1", "255.255.255.255", 67, 68, bootp)
    if a.kind == "dhcp6-adv":
        body = b"\x02\x00\x12\x34"  # ADVERTISE, transaction id
        u = struct.pack("!HHHH", 547, 546, 8 + len(body), 0) + body
        return b"\x33\x33\x00\x01\x00\x02" + src + b"\x86\xdd" + ip6("fe80::99", "ff02::1:2", 17, u)
    if a.kind == "ra":
        ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
        return b"\x33\x33\x00\x00\x00\x01" + src + b"\x86\xdd" + ip6("fe80::99", "ff02::1", 58, ra)
    if a.kind == "spoof":
        return BCAST + src + b"\x88\xb5" + b"\0" * 46
    raise SystemExit(f"unknown kind {a.kind}")


def matches(kind: str, f: bytes) -> bool:
    et = f[12:14]
    if kind == "dhcp4-offer":
        return et == b"\x08\x00" and f[23] == 17 and f[34:38] == struct.pack("!HH", 67, 68)
    if kind == "dhcp6-adv":
        return et == b"\x86\xdd" and f[20] == 17 and f[54:58] == struct.pack("!HH", 547, 546)
    if kind == "ra":
        return et == b"\x86\xdd" and f[20] == 58 and len(f) > 54 and f[54] == 134
    if kind == "spoof":
        return et == b"\x88\xb5"
    return False


def rx_socket(iface: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=("send", "count", "move"))
    ap.add_argument("--iface", required=True)
    ap.add_argument("--kind", required=True)
    ap.add_argument("--src", default="02:00:00:00:00:99")
    ap.add_argument("--ip")
    ap.add_argument("--dst-mac")
    ap.add_argument("--dst-ip")
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=5.0)
    a = ap.parse_args()
    if a.cmd == "send":
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind((a.iface, 0))
        for _ in range(a.count):
            s.send(frame(a))
        print(a.count)
        return
    rx = rx_socket(a.iface)
    if a.cmd == "count":
        print("ready", flush=True)
        kinds = a.kind.split(",")
        n, deadline = dict.fromkeys(kinds, 0), time.monotonic() + a.seconds
        while (left := deadline - time.monotonic()) > 0:
            rx.settimeout(left)
            try:
                f, addr = rx.recvfrom(65535)
            except socket.timeout:
                break
            for k in kinds:
                if addr[2] != PACKET_OUTGOING and matches(k, f):
                    n[k] += 1
        print(json.dumps(n), flush=True)
        return
    # move: the socket listens before the frame goes, so no echo request can be missed
    want = ipaddress.IPv4Address(a.ip).packed
    tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    tx.bind((a.iface, 0))
    sent = time.monotonic()
    tx.send(frame(a))
    first = None
    deadline = sent + a.timeout
    while first is None and (left := deadline - time.monotonic()) > 0:
        rx.settimeout(left)
        try:
            f, addr = rx.recvfrom(65535)
        except socket.timeout:
            break
        if addr[2] != PACKET_OUTGOING and f[12:14] == b"\x08\x00" and f[23] == 1 and f[30:34] == want and f[34] == 8:
            first = time.monotonic()
    print(json.dumps({"sent": sent, "first_echo": first}), flush=True)


if __name__ == "__main__":
    main()
