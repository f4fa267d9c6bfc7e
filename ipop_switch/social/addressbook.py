"""This node's view of addresses: its own social address and one stable address per friend
node, from a local range. Every node chooses its own view; the switch translates between
views (ryu_apps/social_nat.py), so two friends may both use the same own address.

An assignment is kept for ever (across restarts, removals and re-keys) so a friend node keeps
its address in hosts files and applications' configs; overrides from the config win. IPv4
only (docs/social.md says why IPv6 is not carried).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from .ids import bare_jid, friend_label, node_name
from .store import SocialStateError, load_json, save_json

DEFAULT_RANGE = "100.80.0.0/16"  # inside 100.64.0.0/10 (shared address space: never a LAN's or the internet's)
IPv4 = ipaddress.IPv4Address


def parse_range(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise SocialStateError(f"social range {text!r}: {e}") from None
    if net.version != 4 or net.prefixlen > 29:
        raise SocialStateError(f"social range {text!r}: must be an IPv4 network of at least 8 addresses (e.g. {DEFAULT_RANGE})")
    return net


def _override_key(key: str) -> tuple[str, str]:
    """'bob@lab/laptop' -> ('bob@lab', 'laptop'): overrides name one node of a friend."""
    jid, sep, node = key.partition("/")
    if not sep:
        raise SocialStateError(f"address override {key!r}: name the node too (friend@domain/node)")
    return bare_jid(jid), node_name(node)


@dataclass
class AddressBook:
    """Own address + friend node -> address, persisted as JSON."""

    path: Path
    network: ipaddress.IPv4Network
    own: IPv4
    overrides: dict[tuple[str, str], IPv4] = field(default_factory=dict)
    assigned: dict[tuple[str, str], IPv4] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, *, network: str = DEFAULT_RANGE, own: str | None = None,
             overrides: dict[str, str] | None = None) -> "AddressBook":
        net = parse_range(network)
        own_ip = IPv4(own) if own else next(net.hosts())
        if own_ip not in net:
            raise SocialStateError(f"own social address {own_ip} is not in the range {net}")
        book = cls(Path(path), net, own_ip)
        for k, v in (overrides or {}).items():
            ip = IPv4(v)
            if ip not in net or ip in (own_ip, net.network_address, net.broadcast_address):
                raise SocialStateError(f"address override {k} = {v}: must be a host of {net} other than our own")
            book.overrides[_override_key(k)] = ip
        dup = [str(ip) for ip in book.overrides.values() if list(book.overrides.values()).count(ip) > 1]
        if dup:
            raise SocialStateError(f"address overrides repeat {sorted(set(dup))}")
        data = load_json(path, "social address book") or {}
        try:
            for key, ip in data.get("assigned", {}).items():
                jid, _, node = key.rpartition("/")
                addr = IPv4(ip)
                if addr in net:  # the range changed: assignments outside it are made afresh
                    book.assigned[(bare_jid(jid), node_name(node))] = addr
        except (TypeError, ValueError, AttributeError) as e:
            raise SocialStateError(f"social address book {path}: bad entry ({e}); move it away to start afresh") from None
        return book

    def save(self) -> None:
        save_json(self.path, {"network": str(self.network),
                              "assigned": {f"{j}/{n}": str(ip) for (j, n), ip in sorted(self.assigned.items())}})

    def _taken(self) -> set[IPv4]:
        return {self.own, *self.overrides.values(), *self.assigned.values()}

    def address_of(self, jid: str, node: str) -> IPv4:
        """The friend node's address in our view: an override, else its kept assignment, else the
        lowest free host of the range (assigned now and saved)."""
        key = (bare_jid(jid), node_name(node))
        ip = self.overrides.get(key)
        if ip is not None:
            return ip
        ip = self.assigned.get(key)
        if ip is not None and ip not in self.overrides.values() and ip != self.own:
            return ip
        taken = self._taken()
        for cand in self.network.hosts():
            if cand not in taken:
                self.assigned[key] = cand
                self.save()
                return cand
        raise SocialStateError(f"social range {self.network} is full ({len(self.assigned)} friend nodes)")

    def hosts(self, suffix: str, nodes: list[tuple[str, str]]) -> list[str]:
        """Hosts-file lines '<address> <node>.<friend>.<suffix>' for these friend nodes."""
        out = []
        for jid, node in sorted(nodes):
            out.append(f"{self.address_of(jid, node)}\t{node_name(node)}.{friend_label(bare_jid(jid))}.{suffix}")
        return out
