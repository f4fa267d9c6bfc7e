"""Run in a lab host's namespace: capture one tunnel data packet addressed to a worker's
socket, then send it forged, truncated, replayed, with a wrong key and an unknown index.
Prints JSON {"sent": {reason: count}} with the drop reason each packet must produce.

usage: link_attack.py IFACE VICTIM_IP VICTIM_PORT"""

from __future__ import annotations

import json
import os
import socket
import sys

from scapy.all import UDP, sniff  # type: ignore

iface, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
pkts = sniff(iface=iface, filter=f"udp and dst host {ip} and dst port {port} and udp[8] = 0xe3", count=1, timeout=10)
if not pkts:
    print(json.dumps({"error": "no data packet captured"}))
    sys.exit(1)
orig = bytes(pkts[0][UDP].payload)
counter = int.from_bytes(orig[8:16], "big")
flipped = bytearray(orig)
flipped[-1] ^= 0x01                                          # a flipped tag bit, same counter
wrong_key = orig[:8] + (counter + 100000).to_bytes(8, "big") + os.urandom(len(orig) - 16)
unknown = orig[:4] + (int.from_bytes(orig[4:8], "little") ^ 0x5A5A5A5A).to_bytes(4, "little") + orig[8:]
tampered_header = orig[:8] + (counter + 1000).to_bytes(8, "big") + orig[16:]   # the header is the AAD
plan = [("replay", orig), ("replay", bytes(flipped)),       # old counter: refused before decrypting
        ("auth", tampered_header), ("auth", wrong_key), ("malformed", orig[:20]),
        ("malformed", orig[:1]), ("unknown_index", unknown),
        ("handshake_unexpected", bytes([0xE2]) + os.urandom(67)),   # a response to a responder
        ("not_ours", b"\x99" + os.urandom(40))]                      # not ours, not STUN
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent: dict[str, int] = {}
for reason, data in plan:
    s.sendto(data, (ip, port))
    sent[reason] = sent.get(reason, 0) + 1
print(json.dumps({"sent": sent, "captured_len": len(orig)}))
