"""The IPv6 underlay (issue 19 item 5), with real agents in one lab:

- ``v6a``, ``v6b``: IPv6-only sites (no IPv4 outside the hosts' loopback) behind routers that
  only route and filter (stateful, like ``easy``: outbound opens, unsolicited inbound dropped);
- ``dsa`` (easy) and ``dsb`` (hard): dual-stack sites, IPv4 NATed, IPv6 routed;
- ``v4o``: an IPv4-only site behind an easy NAT.

Checked: the lab's shape (no IPv4 on a v6 host, the firewall drops what nobody asked for);
the IPv6-only hosts' agents reach XMPP over IPv6; the IPv6-only pair links directly over
IPv6 through both firewalls; the dual-stack pair, whose IPv4 path would be relayed (easy to
hard), ends direct over IPv6; a dual-stack host links with the IPv4-only one over IPv4; an
IPv6-only host reaches the IPv4-only one through TURN (its relay is IPv4); ``status`` names
each link's underlay family; pings cross every such link.
"""

from __future__ import annotations

import io
import re
import time

import pytest
from rich.console import Console

from conftest import unique_name
from ipop_switch.errors import IpopError
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.lab import ipv6
from ipop_switch.lab.nodes import LabGroup
from ipop_switch.lab.probes import ping
from ipop_switch.render import render_status

pytestmark = [pytest.mark.lab, pytest.mark.slow]

V6A, V6B, DSA, DSB, V4O = "v6ah1", "v6bh1", "dsah1", "dsbh1", "v4oh1"
PAIRS = ((V6A, V6B), (DSA, DSB), (DSA, V4O), (V6A, V4O))
LINK_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def world():
    spec = LabSpec(name=unique_name("v6"), sites=(
        SiteSpec("v6a", "easy", ip="v6"), SiteSpec("v6b", "hard", ip="v6"),
        SiteSpec("dsa", "easy", ip="dual"), SiteSpec("dsb", "hard", ip="dual"),
        SiteSpec("v4o", "easy")))
    lab = Lab(spec)
    group = None
    try:
        lab.up()
        group = LabGroup(lab, "six")
        for h in (V6A, V6B, DSA, DSB, V4O):
            group.add(h)
        t0 = time.monotonic()
        for h in group.nodes:
            group.start(h)
        links = _wait_pairs(group, PAIRS, LINK_TIMEOUT)
        yield lab, group, links, time.monotonic() - t0
    finally:
        try:
            if group is not None:
                group.stop_all()
        finally:
            lab.down()


def _peer(group: LabGroup, host: str, other: str) -> dict | None:
    """``host``'s status entry for its link to ``other``, or None."""
    try:
        peers = group.status(host)["overlays"][0]["peers"]
    except (IpopError, LookupError, OSError):
        return None
    want = group.nodes[other].node_id
    return next((p for p in peers if p["node_id"] == want), None)


def _wait_pairs(group: LabGroup, pairs, timeout: float) -> dict:
    """Each pair's entry (from its first host) once the link is up at both ends."""
    deadline = time.monotonic() + timeout
    out: dict = {}
    while time.monotonic() < deadline and len(out) < len(pairs):
        for a, b in pairs:
            if (a, b) in out:
                continue
            pa, pb = _peer(group, a, b), _peer(group, b, a)
            if pa and pb and pa["state"] == pb["state"] == "up" and pa.get("family"):
                out[(a, b)] = pa
        time.sleep(0.3)
    return out


def test_lab_shape_v6_only_hosts_and_a_firewall_that_drops_the_unsolicited(world):
    lab, _, _, _ = world
    h = lab.host(V6A)
    assert h.ip == "v6" and h.ip6 == ipv6.site_host(1, 1) and h.public_ip == h.ip6
    assert not lab.exec(V6A, ["ip", "-4", "addr", "show", "dev", "eth0"]).stdout.strip()
    assert not lab.exec(V6A, ["ip", "-4", "route", "show", "default"]).stdout.strip()   # (the overlay's is there)
    assert lab.host(DSA).ip6 and lab.host(DSA).lan_ip.startswith("100.64.")
    assert lab.host(V4O).ip6 is None
    # outbound opens, the answer comes back; the same host is not reachable unasked
    assert lab.exec(V6A, ["ping", "-c", "1", "-W", "2", ipv6.XMPP_ADDR6], check=False).returncode == 0
    assert lab.exec("core", ["ping", "-c", "1", "-W", "1", h.ip6], check=False).returncode != 0
    fw = lab.exec("v6ar", ["nft", "list", "chain", "ip6", "ipsw6", "filter_fwd"]).stdout
    dropped = re.search(r'iifname "wan" counter packets (\d+)', fw)
    assert dropped and int(dropped.group(1)) >= 1, fw       # the core's ping, counted


def test_v6_only_agents_signal_over_ipv6(world):
    lab, group, _, _ = world
    for h in (V6A, V6B):
        out = lab.exec(h, ["ss", "-Htn", "state", "established", "dst", f"[{ipv6.XMPP_ADDR6}]:5222"]).stdout
        assert out.strip(), f"{h}: no XMPP connection over IPv6"
        assert ipv6.XMPP_ADDR6 in group.status(h)["overlays"][0]["signaling"]["server"]


def test_every_pair_links_on_the_expected_underlay(world):
    lab, group, links, took = world
    print(f"\nlinks up within {took:.1f}s of the start: "
          + ", ".join(f"{a}-{b} {p['path']} {p.get('candidates')} {p['family']}" for (a, b), p in links.items()))
    assert set(links) == set(PAIRS), f"not up within {LINK_TIMEOUT:.0f}s: {set(PAIRS) - set(links)}"
    # IPv6-only pair: direct over IPv6, through both routers' firewalls
    assert links[(V6A, V6B)]["path"] == "direct" and links[(V6A, V6B)]["family"] == "ipv6"
    # dual-stack, easy to hard: IPv4 would be relayed; IPv6 is direct, and the direct one wins
    assert links[(DSA, DSB)]["path"] == "direct" and links[(DSA, DSB)]["family"] == "ipv6"
    # dual-stack to IPv4-only: over IPv4
    assert links[(DSA, V4O)]["family"] == "ipv4" and links[(DSA, V4O)]["path"] == "direct"
    # IPv6-only to IPv4-only: through TURN, reached over IPv6, relaying on IPv4
    assert links[(V6A, V4O)]["path"] == "relay" and links[(V6A, V4O)]["family"] == "ipv6"
    for a, b in PAIRS:
        assert ping(lab, a, group.address(b, group.name)) is not None, f"{a} -> {b} over the overlay"
        assert ping(lab, b, group.address(a, group.name, v6=True)) is not None, f"{b} -> {a} (overlay IPv6)"


def test_status_names_the_underlay_family(world):
    _, group, _, _ = world
    buf = io.StringIO()
    render_status(group.status(V6A), Console(file=buf, width=240))
    text = buf.getvalue()
    assert "direct (host->host) IPv6" in text, text
