"""Multicast/broadcast sender and counting receiver, run inside a node's namespace.

recv: join the given groups on an interface, count every datagram by its payload
      (payloads are unique per frame sent), write {"<kind> <spec>": {payload: count}} as JSON
      to --out after --duration seconds; touches --out.ready once listening.
send: send --count datagrams with payloads "<tag>-<n>" at --rate per second.

Kinds: udp4 GROUP:PORT (IPv4 multicast or broadcast), udp6 GROUP:PORT, rs6 (ICMPv6
router solicitations to ff02::2, received on a raw socket joined to ff02::2).
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import time
from collections import Counter
from pathlib import Path


def _ifindex(iface: str) -> int:
    return socket.if_nametoindex(iface)


def _v4_addr(iface: str) -> str:
    import fcntl

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", iface.encode()[:15]))[20:24])


def open_recv(kind: str, spec: str, iface: str) -> socket.socket:
    if kind == "udp4":
        group, port = spec.rsplit(":", 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", int(port)))
        if not group.endswith(".255"):
            mreq = socket.inet_aton(group) + socket.inet_aton(_v4_addr(iface))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        return s
    if kind == "udp6":
        group, port = spec.rsplit(":", 1)
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", int(port)))
        mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", _ifindex(iface))
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        return s
    if kind == "rs6":
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        mreq = socket.inet_pton(socket.AF_INET6, "ff02::2") + struct.pack("@I", _ifindex(iface))
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        return s
    raise SystemExit(f"unknown kind {kind}")


def recv(a: argparse.Namespace) -> None:
    socks = {open_recv(k, spec, a.iface): f"{k} {spec}" for k, spec in a.listen}
    counts: dict[str, Counter] = {k: Counter() for k in socks.values()}
    Path(a.out + ".ready").touch()
    end = time.monotonic() + a.duration
    while (left := end - time.monotonic()) > 0:
        r, _, _ = select.select(list(socks), [], [], left)
        for s in r:
            data = s.recv(65535)
            kind = socks[s]
            if kind.startswith("rs6"):
                if data[0] != 133:
                    continue
                data = data[8:]
            counts[kind][data.decode(errors="replace")] += 1
    Path(a.out).write_text(json.dumps({k: dict(v) for k, v in counts.items()}))


def send(a: argparse.Namespace) -> None:
    kind, spec = a.send
    if kind == "udp4":
        group, port = spec.rsplit(":", 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(_v4_addr(a.iface)))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, a.iface.encode())
        dst = (group, int(port))
    elif kind == "udp6":
        group, port = spec.rsplit(":", 1)
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, _ifindex(a.iface))
        dst = (group, int(port), 0, _ifindex(a.iface))
    elif kind == "rs6":
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, _ifindex(a.iface))
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        dst = ("ff02::2", 0, 0, _ifindex(a.iface))
    else:
        raise SystemExit(f"unknown kind {kind}")
    gap = 1.0 / a.rate
    t0 = time.monotonic()
    for n in range(a.count):
        payload = f"{a.tag}-{n}".encode()
        if kind == "rs6":
            payload = struct.pack("!BBHI", 133, 0, 0, 0) + payload
        s.sendto(payload, dst)
        delay = t0 + (n + 1) * gap - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("recv", "send"))
    ap.add_argument("--iface", default="br0")
    ap.add_argument("--listen", nargs=2, action="append", default=[], metavar=("KIND", "SPEC"))
    ap.add_argument("--send", nargs=2, metavar=("KIND", "SPEC"))
    ap.add_argument("--out")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--tag", default="m")
    a = ap.parse_args()
    recv(a) if a.mode == "recv" else send(a)


if __name__ == "__main__":
    main()
