"""Run inside a lab namespace: ask a DNS server one question with dnslib's stub (or send it
raw bytes first), print the answer as one JSON line.

    dns_ask.py SERVER PORT NAME [TYPE] [--garbage HEX]
"""

from __future__ import annotations

import json
import socket
import sys

from dnslib import QTYPE, RCODE, DNSRecord


def main() -> None:
    args = sys.argv[1:]
    garbage = None
    if "--garbage" in args:
        i = args.index("--garbage")
        garbage = bytes.fromhex(args[i + 1])
        del args[i:i + 2]
    server, port, name = args[0], int(args[1]), args[2]
    qtype = args[3] if len(args) > 3 else "A"
    if garbage is not None:
        with socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(garbage, (server, port))
    q = DNSRecord.question(name, qtype)
    reply = DNSRecord.parse(q.send(server, port, timeout=3, ipv6=":" in server))
    print(json.dumps({"rcode": RCODE.get(reply.header.rcode), "aa": bool(reply.header.aa),
                      "answers": [{"type": QTYPE.get(r.rtype), "data": str(r.rdata)} for r in reply.rr]}))


if __name__ == "__main__":
    main()
