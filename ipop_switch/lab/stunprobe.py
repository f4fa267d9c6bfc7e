"""A NAT probe for the lab: STUN binding requests from one local port, then listen.

Run inside a host's namespace (``python -m ipop_switch.lab.stunprobe``). Prints one
JSON line with the mapped address seen by each STUN server, then (with ``--wait``)
one JSON line per datagram that arrives afterwards, so a test can check filtering
and hairpinning. ``send`` mode sends one datagram (the other side of such tests).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from aioice import stun


def binding(sock: socket.socket, server: tuple[str, int], *, timeout: float = 1.0, tries: int = 3) -> tuple[str, int] | None:
    """One STUN Binding transaction (RFC 5389): the XOR-MAPPED-ADDRESS, or None."""
    req = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    for _ in range(tries):
        try:
            sock.sendto(bytes(req), server)
        except OSError:  # e.g. EPERM when a firewall drops our own output
            time.sleep(timeout)
            continue
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, addr = sock.recvfrom(2048)
            except socket.timeout:
                break
            try:
                msg = stun.parse_message(data)
            except ValueError:
                continue
            if msg.transaction_id == req.transaction_id and "XOR-MAPPED-ADDRESS" in msg.attributes:
                host, port = msg.attributes["XOR-MAPPED-ADDRESS"]
                return str(host), int(port)
    return None


def probe(servers: list[tuple[str, int]], *, port: int = 0, wait: float = 0.0, out=sys.stdout) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    local = sock.getsockname()
    mapped = [binding(sock, s) for s in servers]
    print(json.dumps({"local": list(local), "mapped": [list(m) if m else None for m in mapped]}), file=out, flush=True)
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, addr = sock.recvfrom(2048)
        except socket.timeout:
            break
        print(json.dumps({"from": list(addr), "data": data.decode(errors="replace")}), file=out, flush=True)


def send(src: tuple[str, int], dst: tuple[str, int], data: bytes) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(src)
    sock.sendto(data, dst)
    sock.close()


def _addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stunprobe")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("servers", nargs="+", type=_addr)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--wait", type=float, default=0.0)
    s = sub.add_parser("send")
    s.add_argument("--src", type=_addr, default=("0.0.0.0", 0))
    s.add_argument("dst", type=_addr)
    s.add_argument("data")
    a = ap.parse_args(argv)
    if a.cmd == "probe":
        probe(a.servers, port=a.port, wait=a.wait)
    else:
        send(a.src, a.dst, a.data.encode())


if __name__ == "__main__":
    main()
