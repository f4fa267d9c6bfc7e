"""Send frames with fresh source MACs on an interface as fast as possible (packet-in load).

Each frame is a small unicast to --dst from a new locally administered source MAC, so
every frame costs the switch app one learning packet-in. Prints the count sent.
"""

from __future__ import annotations

import argparse
import socket
import struct
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iface", required=True)
    ap.add_argument("--dst", required=True)
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((a.iface, 0))
    dst = bytes(int(x, 16) for x in a.dst.split(":"))
    end = time.monotonic() + a.seconds
    n = 0
    while n < a.count and time.monotonic() < end:
        src = b"\x02\xbb" + struct.pack("!I", n)
        s.send(dst + src + b"\x88\xb5" + b"\0" * 46)  # local experimental ethertype
        n += 1
    print(n)


if __name__ == "__main__":
    main()
