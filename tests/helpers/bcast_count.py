"""Count UDP datagrams arriving on ONE interface (SO_BINDTODEVICE), for isolation tests.
argv: iface port seconds; writes {"payloads": {payload: count}} to stdout after ``seconds``;
prints "ready" to stderr once listening."""

import json
import socket
import sys
import time
from collections import Counter

iface, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
s.bind(("", port))
print("ready", file=sys.stderr, flush=True)
counts: Counter = Counter()
deadline = time.monotonic() + seconds
while (left := deadline - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        data, _ = s.recvfrom(2048)
    except socket.timeout:
        break
    counts[data.decode(errors="replace")] += 1
print(json.dumps({"payloads": counts}), flush=True)
