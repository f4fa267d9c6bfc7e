"""The overlay's name table: who is called what in ``<overlay>.<suffix>``. Pure: no sockets,
no agent; built from members (this node and the peers signaling verified) and looked up by
the responder in ``dns.py``.

Names in a zone ``Z`` (= ``<overlay>.<suffix>``):
- ``<node>.Z``: a member's name (its certificate's common name, or the name its config sets),
  made a DNS label; when two members claim the same name the lower node id keeps it;
- ``<node id>.Z``: always, unique (32 hex digits);
- ``<guest>.<node>.Z`` (and ``<guest>.<node id>.Z``): a guest's static addresses.
A remote member's addresses are published only inside this node's overlay networks, so a
member cannot point a name at an address outside the overlay.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

MAX_GUESTS = 32           # guests a member announces (signaling caps are small)
MAX_ADDRS = 4             # addresses per name and family
_BAD = re.compile(r"[^a-z0-9-]+")
NODE_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def dns_label(text: str) -> str | None:
    """``text`` as one DNS label (RFC 1035 letters, digits, hyphen; at most 63), or None if
    nothing usable is left: 'Alice's Laptop' -> 'alice-s-laptop'."""
    s = _BAD.sub("-", text.strip().lower()).strip("-")[:63].strip("-")
    return s or None


@dataclass(frozen=True)
class Member:
    """One member of the overlay as the name table needs it."""
    node_id: str
    name: str | None                                  # a DNS label, or None (node id only)
    a: tuple[str, ...] = ()
    aaaa: tuple[str, ...] = ()
    guests: tuple[tuple[str, tuple[str, ...]], ...] = ()   # (label, addresses of both families)


def _addrs(values: Iterable[Any]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Bare or CIDR addresses; anything else is skipped."""
    out = []
    for v in values:
        if not isinstance(v, str) or len(v) > 64:
            continue
        try:
            out.append(ipaddress.ip_interface(v).ip)
        except ValueError:
            continue
    return out


def caps_of(name: str | None, address: str, address6: str | None, guests: Iterable[tuple[str, Iterable[str]]]) -> dict:
    """What this node announces to the overlay's members (signed, in its signaling announce):
    ``{"dns": {"name": ..., "a": [...], "aaaa": [...], "guests": {label: [addrs]}}}``.
    Bounded to MAX_GUESTS guests so the announce stays small."""
    g: dict[str, list[str]] = {}
    for gname, addrs in guests:
        label = dns_label(gname)
        ips = [str(a) for a in _addrs(addrs)][:2 * MAX_ADDRS]
        if label and ips and label not in g and len(g) < MAX_GUESTS:
            g[label] = ips
    d: dict[str, Any] = {"a": [str(ipaddress.ip_interface(address).ip)],
                         "aaaa": [str(ipaddress.ip_interface(address6).ip)] if address6 else [], "guests": g}
    if name:
        d["name"] = name
    return {"dns": d}


def member_from_caps(node_id: str, common_name: str, caps: Any) -> Member:
    """A peer's Member from its verified certificate's common name and its announced caps
    (untrusted content: whatever does not parse is left out, never an error)."""
    d = caps.get("dns") if isinstance(caps, dict) else None
    d = d if isinstance(d, dict) else {}
    name = d.get("name") if isinstance(d.get("name"), str) else None
    label = dns_label(name) if name else dns_label(common_name)
    a = d.get("a") if isinstance(d.get("a"), list) else []
    aaaa = d.get("aaaa") if isinstance(d.get("aaaa"), list) else []
    guests = []
    gd = d.get("guests") if isinstance(d.get("guests"), dict) else {}
    for gname, addrs in list(gd.items())[:MAX_GUESTS]:
        gl = dns_label(gname) if isinstance(gname, str) else None
        if gl and isinstance(addrs, list):
            guests.append((gl, tuple(str(x) for x in _addrs(addrs[:2 * MAX_ADDRS]))))
    return Member(node_id, label, tuple(str(x) for x in _addrs(a[:MAX_ADDRS]) if x.version == 4),
                  tuple(str(x) for x in _addrs(aaaa[:MAX_ADDRS]) if x.version == 6), tuple(guests))


@dataclass
class Lookup:
    """The answer for one name: ``outside`` the zone, ``nxdomain`` (in the zone, no such name),
    or the name's addresses (``found``; a type it has none of is NODATA)."""
    kind: Literal["found", "nxdomain", "outside"]
    a: list[str] = field(default_factory=list)
    aaaa: list[str] = field(default_factory=list)


class NameTable:
    """Every name of a zone with its addresses. Build once per change of the members (cheap:
    a dict per member), look up per query."""

    def __init__(self, zone: str, members: Iterable[Member], *,
                 networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
                 trusted: str | None = None) -> None:
        """``networks``: where remote members' addresses must lie (None: anywhere);
        ``trusted``: the node id whose addresses are taken as they are (this node)."""
        self.zone = zone.strip(".").lower()
        self.names: dict[str, tuple[list[str], list[str]]] = {}
        self.conflicts: list[str] = []     # names claimed by more than one member (lower node id kept)
        self.ignored = 0                   # remote addresses outside the overlay's networks
        nets = list(networks) if networks is not None else None
        owner: dict[str, str] = {}
        for m in sorted(members, key=lambda m: m.node_id):
            if not NODE_ID_RE.match(m.node_id):
                continue

            def keep(addrs: Iterable[str]) -> list[str]:
                out = []
                for s in addrs:
                    ip = ipaddress.ip_address(s)
                    if nets is None or m.node_id == trusted or any(ip in n for n in nets if n.version == ip.version):
                        out.append(str(ip))
                    else:
                        self.ignored += 1
                return out[:MAX_ADDRS * 2]
            a, aaaa = keep(m.a), keep(m.aaaa)
            labels = [m.node_id]
            if m.name and m.name != m.node_id:
                if m.name in owner:
                    self.conflicts.append(m.name)
                else:
                    owner[m.name] = m.node_id
                    labels.append(m.name)
            guests = [(g, keep(addrs)) for g, addrs in m.guests]
            for label in labels:
                self.names[f"{label}.{self.zone}"] = (a, aaaa)
                for g, addrs in guests:
                    self.names[f"{g}.{label}.{self.zone}"] = ([x for x in addrs if ":" not in x],
                                                              [x for x in addrs if ":" in x])

    def __len__(self) -> int:
        return len(self.names)

    def in_zone(self, qname: str) -> bool:
        q = qname.rstrip(".").lower()
        return q == self.zone or q.endswith("." + self.zone)

    def lookup(self, qname: str) -> Lookup:
        q = qname.rstrip(".").lower()
        if not self.in_zone(q):
            return Lookup("outside")
        if q == self.zone:
            return Lookup("found")                 # the apex exists (SOA), with no addresses
        hit = self.names.get(q)
        if hit is not None:
            return Lookup("found", list(hit[0]), list(hit[1]))
        return Lookup("nxdomain")
