"""SocialVPN translation (docs/social.md): every node sees its friends' nodes at addresses it
chose itself, and the switch rewrites frames between the views.

Only the receiving side rewrites. A frame from a friend's port is IPv4 unicast from the
friend's own address to whatever address the friend gave us; here its source becomes the
address WE assigned that friend node, its destination our own address, its MACs the friend's
local MAC (below) and our LOCAL port's, and it goes to LOCAL. OVS's set-field on IPv4
addresses fixes the IPv4 header checksum and the TCP/UDP checksums. Sending needs no rewrite:
the host sends to the friend's local address at the friend's local MAC (the app answers the
host's ARP requests for it) and the frame goes out of the friend's port as it is; the friend's
switch makes it fit its own view. So two friends may use the same own address.

Not carried between friends: anything but IPv4 unicast (ARP is answered locally, IPv6 has no
addresses in the scheme, broadcast and multicast stay on the node: a friend is one host to
another, not a LAN, and a friend of a friend must never see our frames). Those frames are
dropped by one flow per friend port and counted (``social_dropped``).

Friend ports never enter the L2 pipeline (learning, flood trees): the app's base flows
drop unknown ports, these flows sit above them. One host per social bridge: its LOCAL port.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable

T_TRAP, T_L2 = 0, 3
PRIO_IN, PRIO_DROP, PRIO_OUT = 500, 490, 200  # above every trap and guard of the L2 pipeline


def friend_mac(address: str) -> str:
    """The MAC a friend node has in our view: locally administered, derived from the address we
    gave it (stable with it; never a real station's)."""
    b = ipaddress.IPv4Address(address).packed
    return "02:5f:" + ":".join(f"{x:02x}" for x in b)


@dataclass(frozen=True)
class FriendPort:
    peer: str      # the friend node's node id
    address: str   # its address in our view
    mac: str       # friend_mac(address)


class SocialNat:
    """The app's social state: own address and MAC, friend ports; flows and ARP answers from it."""

    def __init__(self) -> None:
        self.address: str | None = None
        self.mac: str | None = None
        self.ports: dict[str, FriendPort] = {}   # OVS port name -> friend node

    # -- told by the agent --------------------------------------------------------------
    def set_own(self, address: str, mac: str) -> None:
        if any(f.address == address for f in self.ports.values()):
            raise ValueError(f"{address} is a friend's address here")
        self.address, self.mac = address, mac

    def add(self, port: str, peer: str, address: str) -> None:
        """Raises ValueError if the address is ours or another friend port's (ARP would be ambiguous)."""
        if address == self.address:
            raise ValueError(f"{address} is our own social address")
        for name, f in self.ports.items():
            if name != port and f.address == address:
                raise ValueError(f"{address} is already friend port {name}'s")
        self.ports[port] = FriendPort(peer, address, friend_mac(address))

    def remove(self, port: str) -> None:
        self.ports.pop(port, None)

    @property
    def active(self) -> bool:
        return self.address is not None and bool(self.ports)

    def is_friend_port(self, port: str) -> bool:
        return port in self.ports

    # -- flows --------------------------------------------------------------------------
    def flows(self, port_no: dict[str, int], local: int, add: Callable[..., None], kinds: tuple[int, int, int]) -> None:
        """Install through the app's ``add(table, prio, match, **spec)`` (its base-flow set, so a
        friend port going takes its flows with it). kinds: cookie kinds (translated, dropped, out)."""
        k_in, k_drop, k_out = kinds
        for name, f in sorted(self.ports.items()):
            no = port_no.get(name)
            if no is None:
                continue
            # notify: a removed flow's count is kept (the counters stay monotonic)
            add(T_TRAP, PRIO_DROP, {"in_port": no}, kind=k_drop, notify=True)  # not IPv4 unicast: stays on the node
            if self.address is None or self.mac is None:
                continue
            add(T_TRAP, PRIO_IN, {"in_port": no, "eth_type": 0x0800, "eth_dst": ("00:00:00:00:00:00", "01:00:00:00:00:00")},
                set=[("eth_src", f.mac), ("eth_dst", self.mac), ("ipv4_src", f.address), ("ipv4_dst", self.address)],
                out=[local], kind=k_in, notify=True)
            add(T_L2, PRIO_OUT, {"eth_type": 0x0800, "eth_dst": f.mac, "ipv4_dst": f.address}, out=[no], kind=k_out)

    def arp_answer(self, tpa: str) -> bytes | None:
        """Our friend's MAC for an ARP request from the host asking for a friend's address."""
        if self.address is None:
            return None
        for f in self.ports.values():
            if f.address == tpa:
                return bytes.fromhex(f.mac.replace(":", ""))
        return None

    def count(self, body: list[Any], counters: dict[str, int], kinds: tuple[int, int, int]) -> None:
        """Add the social flows' packet counts (a flow-stats reply) to the app's counters."""
        k_in, k_drop, _ = kinds
        for s in body:
            kind = s.cookie >> 48
            if kind == k_in:
                counters["social_translated"] += s.packet_count
            elif kind == k_drop:
                counters["social_dropped"] += s.packet_count

    def status(self, port_no: dict[str, int]) -> dict[str, Any]:
        return {"address": self.address, "mac": self.mac,
                "friends": {n: {"peer": f.peer, "address": f.address, "mac": f.mac, "ofport": port_no.get(n)}
                            for n, f in sorted(self.ports.items())}}
