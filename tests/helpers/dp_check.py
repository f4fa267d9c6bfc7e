"""Data integrity through a link, run inside a lab namespace (tests/test_datapath_lab.py).

  dp_check.py tcp-server ADDR PORT            receive one connection, print sha256 and byte count
  dp_check.py tcp-client ADDR PORT NBYTES     send NBYTES of seeded random data, print its sha256
  dp_check.py udp-echo ADDR PORT SECONDS      echo datagrams back for SECONDS
  dp_check.py udp-sizes ADDR PORT MAXSIZE     one datagram of every size 1..MAXSIZE with DF set,
                                              each echoed intact; prints JSON {ok, bad, lost}
Every wait is bounded; exit status 0 unless something could not be set up.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import sys
import time

IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2


def tcp_server(addr: str, port: int) -> None:
    srv = socket.create_server((addr, port))
    srv.settimeout(30)
    c, _ = srv.accept()
    c.settimeout(30)
    h, n = hashlib.sha256(), 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        h.update(b)
        n += len(b)
    print(json.dumps({"sha256": h.hexdigest(), "bytes": n}), flush=True)


def tcp_client(addr: str, port: int, nbytes: int) -> None:
    rnd = random.Random(nbytes)
    s = socket.create_connection((addr, port), timeout=10)
    s.settimeout(30)
    h, left = hashlib.sha256(), nbytes
    while left:
        # odd sizes so segments of every length appear, not only full MSS
        b = rnd.randbytes(min(left, rnd.choice((1, 7, 100, 1399, 4096, 65536, 200_000))))
        s.sendall(b)
        h.update(b)
        left -= len(b)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()
    print(json.dumps({"sha256": h.hexdigest(), "bytes": nbytes}), flush=True)


def udp_echo(addr: str, port: int, seconds: float) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s.settimeout(max(0.05, end - time.monotonic()))
        try:
            b, a = s.recvfrom(65535)
        except socket.timeout:
            continue
        s.sendto(b, a)


def udp_sizes(addr: str, port: int, maxsize: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    s.connect((addr, port))
    ok = bad = lost = 0
    for size in range(1, maxsize + 1):
        b = random.Random(size).randbytes(size)
        for _ in range(3):
            s.send(b)
            s.settimeout(0.5)
            try:
                got = s.recv(65535)
            except socket.timeout:
                continue
            if got == b:
                ok += 1
            else:
                bad += 1
            break
        else:
            lost += 1
    print(json.dumps({"ok": ok, "bad": bad, "lost": lost}), flush=True)


if __name__ == "__main__":
    cmd, a = sys.argv[1], sys.argv[2:]
    {"tcp-server": lambda: tcp_server(a[0], int(a[1])), "tcp-client": lambda: tcp_client(a[0], int(a[1]), int(a[2])),
     "udp-echo": lambda: udp_echo(a[0], int(a[1]), float(a[2])),
     "udp-sizes": lambda: udp_sizes(a[0], int(a[1]), int(a[2]))}[cmd]()
