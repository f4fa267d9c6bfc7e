"""The lab's IPv6: addresses (ULA, fd00::/8 only) and the stateful firewall of a routed site.

IPv6 is never translated here (no NAT66, as on real dual-stack and IPv6-only networks):
- the core bridge ``pub`` is one /64, ``fd00:198:18::/64``: the services on ::1 (XMPP),
  ::2 (STUN/TURN) and ::3 (second STUN address); the core itself routes (``CORE_GW``) to
  every site's prefix through that site's router;
- a public host (site ``none``) has ``fd00:198:18::<i>:<10+j>`` on the core's /64;
- a NATed site's router has ``fd00:198:18::<i>:1`` on its WAN and ``fd00:100:<i>::1`` on its
  LAN; its hosts ``fd00:100:<i>::<10+j>/64``, routed, behind ``firewall_ruleset``: what a
  host sends opens the way back (conntrack), nothing unsolicited gets in -- the filtering of
  ``easy`` (address- and port-dependent), with nothing mapped.
(<i> and <j> are written in hex, as IPv6 groups are.)
"""

from __future__ import annotations

from .nat import _chain, _loss_rule

CORE_NET = "fd00:198:18::/64"
PREFIX = 64
XMPP_ADDR6 = "fd00:198:18::1"
TURN_ADDR6 = "fd00:198:18::2"
STUN_ADDR6_2 = "fd00:198:18::3"
CORE_GW = "fd00:198:18::fe"        # the core as the public side's IPv6 router


def public_host(i: int, j: int) -> str:
    """Host ``j`` of public site ``i`` on the core's /64."""
    return f"fd00:198:18::{i:x}:{10 + j:x}"


def router_wan(i: int) -> str:
    return f"fd00:198:18::{i:x}:1"


def site_net(i: int) -> str:
    return f"fd00:100:{i:x}::/64"


def router_lan(i: int) -> str:
    return f"fd00:100:{i:x}::1"


def site_host(i: int, j: int) -> str:
    return f"fd00:100:{i:x}::{10 + j:x}"


# Neighbour discovery must reach the router itself whatever the filter says (conntrack does not
# track it as a connection), as must the errors that make path MTU discovery work.
_ND = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert } accept"


def firewall_ruleset(*, wan_if: str, loss: float = 0.0, udp_blocked: bool = False) -> str:
    """The routed site's IPv6 filter (table ``ip6 ipsw6`` in its router): outbound opens,
    replies and related ICMPv6 errors come back, unsolicited inbound is dropped and counted;
    the site's ``udp_blocked`` and ``loss`` as its IPv4 rules do them."""
    fwd = ["ct state established,related accept",
           f'iifname "{wan_if}" counter drop']         # unsolicited inbound (new or invalid)
    if udp_blocked:
        fwd.insert(0, "meta l4proto udp counter drop")
    if loss > 0:
        fwd.insert(0, _loss_rule(loss))
    inp = [_ND, "ct state established,related accept", f'iifname "{wan_if}" counter drop']
    return ("table ip6 ipsw6 {\n"
            + _chain("filter_fwd", "forward", fwd)
            + _chain("filter_in", "input", inp)
            + "}\n")
