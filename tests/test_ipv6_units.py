"""The IPv6 underlay's parts without a lab: the site option, the address plan (ULA only),
the routed site's firewall rules, server addresses in brackets, which host addresses become
candidates, a path's family and how status shows it."""

from __future__ import annotations

import ipaddress
from io import StringIO
from types import SimpleNamespace

import pytest
from rich.console import Console

from ipop_switch.config import IceConfig
from ipop_switch import hostport
from ipop_switch.lab import LabSpec, SiteSpec, ipv6
from ipop_switch.lab.spec import LabSpecError
from ipop_switch.render import render_status
from ipop_switch.servers import prosody_config
from ipop_switch.tunnel import ice
from ipop_switch.tunnel.messages import LinkSpec


def test_site_ip_option_flags_toml_and_errors(tmp_path):
    spec = LabSpec.from_flags(sites=3, nat="none,easy", ip="v6,dual")
    assert [s.ip for s in spec.sites] == ["v6", "dual", "dual"] and spec.has_v6
    assert not LabSpec.from_flags(sites=2).has_v6 and SiteSpec("a").ip == "v4"
    assert SiteSpec("a", ip="v6").has_v6 and not SiteSpec("a", ip="v6").has_v4
    with pytest.raises(LabSpecError, match="ip 'v5' is not one of v4, dual, v6"):
        SiteSpec("a", ip="v5")
    with pytest.raises(LabSpecError, match="cgnat is IPv4 only"):
        SiteSpec("a", "easy", cgnat=True, ip="dual")
    f = tmp_path / "lab.toml"
    f.write_text('[[site]]\nname = "a"\nip = 6\n')
    with pytest.raises(LabSpecError, match=r"site\[0\].ip: wrong type"):
        LabSpec.from_toml(f)
    f.write_text('[[site]]\nname = "a"\nip = "dual"\n')
    assert LabSpec.from_toml(f).sites[0].ip == "dual"


def test_address_plan_is_ula_and_distinct():
    ula = ipaddress.ip_network("fd00::/8")
    addrs = [ipv6.XMPP_ADDR6, ipv6.TURN_ADDR6, ipv6.STUN_ADDR6_2, ipv6.CORE_GW]
    for i in (1, 2, 15, 200):
        addrs += [ipv6.public_host(i, 1), ipv6.public_host(i, 50), ipv6.router_wan(i), ipv6.router_lan(i),
                  ipv6.site_host(i, 1), ipv6.site_host(i, 50)]
        assert ipaddress.ip_address(ipv6.site_host(i, 3)) in ipaddress.ip_network(ipv6.site_net(i))
        assert ipaddress.ip_address(ipv6.router_wan(i)) in ipaddress.ip_network(ipv6.CORE_NET)
    assert all(ipaddress.ip_address(a) in ula for a in addrs)
    assert len(set(addrs)) == len(addrs)


def test_firewall_rules_filter_like_easy_and_keep_neighbour_discovery():
    r = ipv6.firewall_ruleset(wan_if="wan")
    assert r.startswith("table ip6 ipsw6 {") and "nat" not in r     # routed, never translated
    fwd = r.split("chain filter_fwd", 1)[1].split("chain filter_in", 1)[0]
    assert fwd.index("ct state established,related accept") < fwd.index('iifname "wan" counter drop')
    inp = r.split("chain filter_in", 1)[1]
    assert inp.index("nd-neighbor-solicit") < inp.index('iifname "wan" counter drop')
    r = ipv6.firewall_ruleset(wan_if="wan", loss=2.5, udp_blocked=True)
    assert "numgen random mod 10000 < 250 counter drop" in r and "meta l4proto udp counter drop" in r


def test_server_addresses_in_brackets_and_prosody_on_both_families(tmp_path):
    assert hostport.split("[fd00:198:18::2]:3479", 3478) == ("fd00:198:18::2", 3479)
    assert hostport.split("[fd00::2]", 3478) == ("fd00::2", 3478)
    assert hostport.split("fd00::2", 3478) == ("fd00::2", 3478)
    assert hostport.split("turn.example:3479", 3478) == ("turn.example", 3479)
    with pytest.raises(ValueError, match="use \\[v6\\]:port"):
        hostport.split("[fd00::2]x", 3478)
    c = IceConfig(stun="[fd00:198:18::2]:3478")
    assert c.stun_addr() == ("fd00:198:18::2", 3478) and c.ipv6
    assert not IceConfig(ipv6=False).ipv6
    cfg = prosody_config(tmp_path, tmp_path, ["198.18.0.1", "fd00:198:18::1"], pidfile=tmp_path / "p", run_as_root=True)
    assert 'interfaces = { "198.18.0.1", "fd00:198:18::1" }' in cfg


def test_candidate_addresses_never_link_local(monkeypatch):
    ips = [SimpleNamespace(ip="100.64.1.11"), SimpleNamespace(ip=("fd00:100:1::b", 0, 0)),
           SimpleNamespace(ip=("2001:db8::1", 0, 0)), SimpleNamespace(ip=("fe80::1", 0, 2)),
           SimpleNamespace(ip=("fe80::2", 0, 0)), SimpleNamespace(ip=("::1", 0, 0))]
    monkeypatch.setattr(ice.ifaddr, "get_adapters", lambda: [SimpleNamespace(nice_name="eth0", ips=ips)])
    assert ice.host_addresses([], True) == ["100.64.1.11", "fd00:100:1::b", "2001:db8::1"]
    assert ice.host_addresses([], False) == ["100.64.1.11"]
    assert LinkSpec("l", "p", True, b"\0" * 32, b"\1" * 32, "t").ipv6            # on by default
    spec = LinkSpec.from_json(LinkSpec("l", "p", True, b"\0" * 32, b"\1" * 32, "t", ipv6=False).to_json())
    assert spec.ipv6 is False


def test_path_family_and_status_shows_it():
    proto = SimpleNamespace(transport=SimpleNamespace(sendto=lambda *a: None),
                            local_candidate=SimpleNamespace(type="host", host="fd00:100:1::b", port=4000))
    remote = SimpleNamespace(type="host")
    p = ice.make_path(proto, remote, ("fd00:100:2::b", 4001))
    assert p.family == "ipv6" and p.describe()["family"] == "ipv6"
    assert ice.make_path(proto, remote, ("198.18.1.11", 4001)).family == "ipv4"
    peer = {"node_id": "cd" * 16, "state": "up", "path": "direct", "candidates": "host->host", "family": "ipv6",
            "remote_addr": "host fd00:100:2::b:4001", "drops": {}}
    st = {"node": {"node_id": "ab" * 16}, "overlays": [{"name": "g", "peers": [peer]}]}
    c = Console(file=StringIO(), width=250)
    render_status(st, c)
    assert "direct (host->host) IPv6" in c.file.getvalue()


def test_other_vpns_devices_are_not_gathered_whatever_their_name(monkeypatch, tmp_path):
    """TUN/TAP devices (tun_flags in sysfs) and kernel WireGuard (DEVTYPE=wireguard) are left
    out even when no name pattern knows them (OpenVPN's 'ovpntap', n2n's 'n2n0' once won the
    ICE checks in the bench and carried the link inside OpenVPN); a host whose only addressed
    interfaces are such devices still gathers from them."""
    from types import SimpleNamespace
    from ipop_switch.tunnel import ice

    sysnet = tmp_path / "net"
    for name, files in {"eth0": {"uevent": "INTERFACE=eth0\n"}, "ovpntap": {"tun_flags": "0x1002\n"},
                        "n2n0": {"tun_flags": "0x1002\n"}, "wgx": {"uevent": "DEVTYPE=wireguard\nINTERFACE=wgx\n"}}.items():
        (sysnet / name).mkdir(parents=True)
        for f, text in files.items():
            (sysnet / name / f).write_text(text)

    def adapter(name, ip):
        return SimpleNamespace(nice_name=name, ips=[SimpleNamespace(ip=ip, network_prefix=24)])

    every = [adapter("eth0", "198.18.1.11"), adapter("ovpntap", "100.98.4.1"), adapter("n2n0", "100.98.5.1"),
             adapter("wgx", "100.98.1.1")]
    monkeypatch.setattr(ice.ifaddr, "get_adapters", lambda: every)
    assert ice.host_addresses([], False, str(sysnet)) == ["198.18.1.11"]
    assert ice.is_tunnel_device("ovpntap", str(sysnet)) and ice.is_tunnel_device("wgx", str(sysnet))
    assert not ice.is_tunnel_device("eth0", str(sysnet)) and not ice.is_tunnel_device("gone", str(sysnet))
    monkeypatch.setattr(ice.ifaddr, "get_adapters", lambda: every[1:])
    assert ice.host_addresses([], False, str(sysnet)) == ["100.98.4.1", "100.98.5.1", "100.98.1.1"]
