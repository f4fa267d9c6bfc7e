"""A DHCP client (scapy) for one DISCOVER/OFFER/REQUEST/ACK exchange from a made-up station
MAC on an interface; prints JSON {"offer": ip|None, "ack": ip|None, "server": ip|None}."""

import json
import random
import sys

from scapy.all import BOOTP, DHCP, IP, UDP, Ether, conf, srp1

conf.verb = 0
conf.checkIPaddr = False  # replies come from the server, not from 255.255.255.255


def exchange(iface: str, mac: str, timeout: float) -> dict:
    xid = random.randrange(1, 2**31)
    chaddr = bytes.fromhex(mac.replace(":", ""))
    base = Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
    discover = base / BOOTP(chaddr=chaddr, xid=xid, flags=0x8000) / DHCP(options=[("message-type", "discover"), "end"])
    offer = srp1(discover, iface=iface, timeout=timeout, filter="udp and port 68")
    if offer is None or BOOTP not in offer:
        return {"offer": None, "ack": None, "server": None}
    ip = offer[BOOTP].yiaddr
    server = dict(o for o in offer[DHCP].options if isinstance(o, tuple)).get("server_id")
    request = base / BOOTP(chaddr=chaddr, xid=xid, flags=0x8000) / DHCP(options=[
        ("message-type", "request"), ("requested_addr", ip), ("server_id", server), "end"])
    ack = srp1(request, iface=iface, timeout=timeout, filter="udp and port 68")
    got = ack[BOOTP].yiaddr if ack is not None and BOOTP in ack else None
    return {"offer": ip, "ack": got, "server": server}


if __name__ == "__main__":
    iface, mac = sys.argv[1], sys.argv[2]
    print(json.dumps(exchange(iface, mac, float(sys.argv[3]) if len(sys.argv) > 3 else 5.0)), flush=True)
