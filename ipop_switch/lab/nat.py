"""nftables rule sets for the lab's NAT routers and site-edge impairments.

Mapping behaviours (RFC 4787 terms):
- ``one2one``: static 1:1 (each host its own public address, ports kept), no filtering;
- ``easy``: masquerade, which keeps the source port: endpoint-independent mapping,
  with conntrack's address-and-port-dependent filtering;
- ``hard``: masquerade ``fully-random``: a new port per destination (endpoint-dependent).
Hairpinning (a LAN host reaching another through the public mapping) is done for
one2one with static rules and for easy/hard with a dynamic map filled from the
translated packets (public port -> LAN address), since masquerade itself keeps no
reverse lookup usable from the LAN side (UDP only).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouterPlan:
    nat: str                       # one2one | easy | hard
    wan_if: str
    lan_if: str
    lan_net: str                   # e.g. 100.64.1.0/24
    wan_ip: str                    # the router's own public address
    hosts: tuple[tuple[str, str], ...]  # (lan ip, public ip) per host (public = wan_ip unless one2one)
    hairpin: bool = False
    loss: float = 0.0
    udp_blocked: bool = False


def _loss_rule(loss: float) -> str:
    """Drop ``loss`` percent of packets (nftables numgen; resolution 0.01%)."""
    if loss <= 0:
        return ""
    return f"numgen random mod 10000 < {int(round(loss * 100))} counter drop"


def _chain(name: str, hook: str, rules: list[str], *, prio: str = "filter", kind: str = "filter") -> str:
    """One nftables base chain (policy accept) holding ``rules``."""
    body = "".join(f"    {r}\n" for r in rules)
    return f"  chain {name} {{\n    type {kind} hook {hook} priority {prio}; policy accept;\n{body}  }}\n"


def router_ruleset(p: RouterPlan) -> str:
    pre: list[str] = []
    post: list[str] = []
    post_late: list[str] = []
    fwd: list[str] = []
    sets = ""
    if p.nat == "one2one":
        for lan, pub in p.hosts:
            pre.append(f'ip daddr {pub} dnat to {lan}' if p.hairpin else f'iifname "{p.wan_if}" ip daddr {pub} dnat to {lan}')
            post.append(f'oifname "{p.wan_if}" ip saddr {lan} snat to {pub}')
            if p.hairpin:
                post.append(f'oifname "{p.lan_if}" ip saddr {lan} ct status dnat snat to {pub}')
    else:
        flags = " fully-random" if p.nat == "hard" else ""
        post.append(f'oifname "{p.wan_if}" ip saddr {p.lan_net} masquerade{flags}')
        fwd.append(f'iifname "{p.wan_if}" ct state new counter drop')  # no unsolicited inbound
        if p.hairpin:
            sets = "  map hairpin { type inet_service : ipv4_addr; flags dynamic,timeout; timeout 180s; }\n"
            post_late.append(f'oifname "{p.wan_if}" meta l4proto udp update @hairpin {{ udp sport : ct original ip saddr }}')
            pre.append(f'iifname "{p.lan_if}" ip daddr {p.wan_ip} meta l4proto udp dnat to udp dport map @hairpin')
            post.append(f'oifname "{p.lan_if}" ip saddr {p.lan_net} ct status dnat snat to {p.wan_ip}')
    # Nothing unsolicited reaches the router itself: otherwise a peer's early probe to the
    # router's public address gets a conntrack entry of its own, and masquerade then gives
    # our next flow to that peer another port (easy<->easy punching fails depending on timing)
    inp = [f'iifname "{p.wan_if}" ct state new counter drop']
    if p.udp_blocked:
        fwd.insert(0, "meta l4proto udp counter drop")
    if p.loss > 0:
        fwd.insert(0, _loss_rule(p.loss))

    return (
        "table ip ipsw {\n" + sets
        + _chain("pre", "prerouting", pre, prio="dstnat", kind="nat")
        + _chain("post", "postrouting", post, prio="srcnat", kind="nat")
        + _chain("post_late", "postrouting", post_late, prio="srcnat + 10")
        + _chain("filter_fwd", "forward", fwd)
        + _chain("filter_in", "input", inp)
        + "}\n"
    )


def host_edge_ruleset(dev: str, *, udp_blocked: bool) -> str:
    """Impairments for a public host (no router), in its own namespace: UDP blocked both ways.
    Its loss is applied in the core (``core_port_loss_ruleset``), where traffic is single
    datagrams: the host's own hooks see UDP GSO bursts on the way out and GRO aggregates on
    the way in."""
    if not udp_blocked:
        return ""
    return ("table inet ipsw_edge {\n"
            + _chain("edge_in", "input", [f'iifname "{dev}" meta l4proto udp counter drop'])
            + _chain("edge_out", "output", [f'oifname "{dev}" meta l4proto udp counter drop'])
            + "}\n")


def core_port_loss_ruleset(port: str, loss: float) -> str:
    """Loss both ways of a public host, on the core bridge's port towards it (one table per
    port): what it sends (``iifname``) and what it is sent (``oifname``), forwarded or from the
    core's own services.

    Only IP is lost: the bridge family also sees ARP, and a lost ARP reply is not what a lossy
    Internet path does (it made a host unreachable for seconds, failing whole bursts)."""
    name = "ipsw_loss_" + "".join(c for c in port if c.isalnum())
    lose = f'meta protocol {{ ip, ip6 }} {_loss_rule(loss)}'
    return (f"table bridge {name} {{\n"
            + _chain("port_fwd", "forward", [f'iifname "{port}" {lose}', f'oifname "{port}" {lose}'])
            + _chain("port_in", "input", [f'iifname "{port}" {lose}'])
            + _chain("port_out", "output", [f'oifname "{port}" {lose}'])
            + "}\n")


def host_udp_drop_ruleset(table: str, peer_ip: str | None = None) -> str:
    """A table dropping UDP in and out of a host's own stack (where its ICE sockets live), to
    and from ``peer_ip`` only if given: a cut path, for tests and benches."""
    out_m = f"ip daddr {peer_ip} " if peer_ip else ""
    in_m = f"ip saddr {peer_ip} " if peer_ip else ""
    return (f"table inet {table} {{\n"
            f" chain out {{\n  type filter hook output priority filter; policy accept;\n  {out_m}meta l4proto udp drop\n }}\n"
            f" chain in {{\n  type filter hook input priority filter; policy accept;\n  {in_m}meta l4proto udp drop\n }}\n"
            "}\n")
