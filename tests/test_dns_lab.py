"""DNS names in the lab: three real agents (ipop-switch up) behind none/easy/hard NATs (the
easy-hard pair relayed), each with [overlay.dns] on (port 53 on its overlay address and its
127.53.x.y). From every node every other node's name resolves to its overlay addresses,
a guest's name to its static address, ``ping <name>`` works through the system resolver
(a resolv.conf that ``ip netns exec`` mounts for the host's namespace), unknown names are
NXDOMAIN, other domains REFUSED, a malformed datagram is counted and the responder still
answers; a port in use stops the agent with one error line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import helper, unique_name
from ipop_switch.config import dns_loopback
from ipop_switch.config_writer import write_config
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.lab.nodes import LabGroup
from ipop_switch.lab.probes import wait_links

pytestmark = [pytest.mark.lab, pytest.mark.slow]

OVERLAY, NET = "names", 93
ZONE = f"{OVERLAY}.ipsw.internal"
HOSTS = {"pubh1": 1, "easyh1": 2, "hardh1": 3}
GUEST = {"name": "web", "addr": f"100.{NET}.20.1"}         # a guest of pubh1, static address
LINKS_TIMEOUT = 60.0


def enable_dns(cfg: Path, **dns) -> None:
    """Turn [overlay.dns] on in a lab node's config (written again with the one config writer)."""
    doc = tomllib.loads(cfg.read_text())
    doc["overlay"][0]["dns"] = {"enable": True, **dns}
    write_config(cfg, doc, header="written by the ipop-switch lab; [overlay.dns] by test_dns_lab")


def ask(lab: Lab, host: str, server: str, name: str, qtype: str = "A", garbage: bytes | None = None,
        port: int = 53) -> dict:
    argv = [*helper("dns_ask"), server, str(port), name, qtype]
    if garbage is not None:
        argv += ["--garbage", garbage.hex()]
    r = lab.exec(host, argv, check=False, timeout=20)
    assert r.returncode == 0, f"dns_ask on {host} {name}: {r.stdout}{r.stderr}"
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def world():
    lab = Lab(LabSpec(name=unique_name("n"), sites=tuple(SiteSpec(h[:-2], h[:-2] if h != "pubh1" else "none")
                                                         for h in HOSTS) + (SiteSpec("late", "none"),)))
    group = None
    etc: list[Path] = []
    try:
        lab.up()
        group = LabGroup(lab, OVERLAY, net=NET)
        for host, n in HOSTS.items():
            attach = None
            if host == "pubh1":
                attach = [{"name": GUEST["name"], "netns": lab.add_namespace(f"{host}web"),
                           "addresses": [f"{GUEST['addr']}/16"]}]
            node = group.add(host, index=n, attach=attach)
            enable_dns(node.config)
            group.start(host)
        assert wait_links(group, timeout=LINKS_TIMEOUT) is not None, "links did not all come up"
        # the system resolver of each host's namespace asks its own node (ip netns exec mounts it)
        for host in HOSTS:
            d = Path("/etc/netns") / lab.netns_of(host)
            d.mkdir(parents=True, exist_ok=True)
            etc.append(d)
            (d / "resolv.conf").write_text(f"nameserver {dns_loopback(OVERLAY)}\noptions timeout:2 attempts:2\n")
        yield lab, group
    finally:
        for d in etc:
            shutil.rmtree(d, ignore_errors=True)
        if group:
            group.stop_all()
        lab.down()


def test_every_node_resolves_every_other_and_pings_by_name(world):
    lab, g = world
    for host in HOSTS:
        me = g.nodes[host]
        for server in (dns_loopback(OVERLAY), me.ip):           # both listen addresses
            for other, node in g.nodes.items():
                a = ask(lab, host, server, f"{other}.{ZONE}")
                assert a["rcode"] == "NOERROR" and a["aa"], a
                assert [x["data"] for x in a["answers"]] == [node.ip], (host, other, a)
                six = ask(lab, host, server, f"{other}.{ZONE}", "AAAA")
                assert [x["data"] for x in six["answers"]] == [node.ip6], (host, other, six)
        # by node id too, and the guest of pubh1 under its node's name
        pub = g.nodes["pubh1"]
        assert [x["data"] for x in ask(lab, host, me.ip, f"{pub.node_id}.{ZONE}")["answers"]] == [pub.ip]
        assert [x["data"] for x in ask(lab, host, me.ip, f"{GUEST['name']}.pubh1.{ZONE}")["answers"]] == [GUEST["addr"]]
        for other, node in g.nodes.items():
            if other == host:
                continue
            for fam, ip in (("-4", node.ip), ("-6", node.ip6)):
                r = lab.exec(host, ["ping", fam, "-c", "2", "-i", "0.2", "-W", "2", f"{other}.{ZONE}"], check=False,
                             timeout=30)
                assert r.returncode == 0, f"{host}: ping {fam} {other}.{ZONE}: {r.stdout}{r.stderr}"
                assert f"({ip})" in r.stdout, r.stdout
    # the guest answers by name too (through pubh1's bridge, from another node)
    r = lab.exec("hardh1", ["ping", "-4", "-c", "2", "-i", "0.2", "-W", "2", f"{GUEST['name']}.pubh1.{ZONE}"],
                 check=False, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_unknown_names_other_domains_and_malformed_queries(world):
    lab, g = world
    host = "easyh1"
    ip = g.nodes[host].ip
    nx = ask(lab, host, ip, f"nobody.{ZONE}")
    assert nx["rcode"] == "NXDOMAIN" and not nx["answers"], nx
    assert ask(lab, host, ip, f"nobody.pubh1.{ZONE}")["rcode"] == "NXDOMAIN"
    assert ask(lab, host, ip, "example.com")["rcode"] == "REFUSED"
    before = (g.status(host)["overlays"][0]["dns"] or {}).get("drops", {}).get("malformed", 0)
    # a malformed datagram first, then a good query on the same socket path: still answered
    a = ask(lab, host, ip, f"hardh1.{ZONE}", garbage=b"\x13\x37" + b"\xff" * 40)
    assert [x["data"] for x in a["answers"]] == [g.nodes["hardh1"].ip]
    st = g.status(host)["overlays"][0]["dns"]
    assert st["drops"].get("malformed", 0) == before + 1, st
    assert st["zone"] == ZONE and st["names"] >= 2 * len(HOSTS) and st["nxdomain"] >= 2 and st["refused"] >= 1
    # 'ipop-switch dns --check' asks the running responder, and prints the resolved commands
    r = lab.exec(host, [sys.executable, "-m", "ipop_switch.cli", "dns", "-c", str(g.nodes[host].config), "--check",
                        "--json"], check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    adv = json.loads(r.stdout)[0]
    assert adv["check"]["ok"] and adv["zone"] == ZONE, adv
    assert adv["resolved"] == [f"resolvectl dns ipsw{OVERLAY} {ip}", f"resolvectl domain ipsw{OVERLAY} '~{ZONE}'"]
    # the status table shows it, as a user reads it
    r = lab.exec(host, [sys.executable, "-m", "ipop_switch.cli", "status", "-c", str(g.nodes[host].config)],
                 check=False, timeout=30)
    assert r.returncode == 0 and f"dns: {ZONE}" in r.stdout and "malformed" in r.stdout, r.stdout


def test_port_in_use_is_one_error_line(world):
    lab, g = world
    node = g.add("lateh1", index=9)
    enable_dns(node.config)
    ns = lab.netns_of("lateh1")
    holder = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                               "import socket,sys,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
                               f"s.bind(({dns_loopback(OVERLAY)!r},53)); print('bound',flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "bound"
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "ipop_switch.cli", "up", "-c",
                            str(node.config)], capture_output=True, text=True, timeout=90)
        assert r.returncode == 1, r.stderr
        errors = [l for l in r.stderr.splitlines() if l.startswith("ipop-switch: error:")]
        assert errors == [f"ipop-switch: error: dns: cannot listen on {dns_loopback(OVERLAY)}:53: Address already "
                          "in use (another DNS server there? set [overlay.dns] port or listen)"], r.stderr
        assert "Traceback" not in r.stderr, r.stderr
    finally:
        holder.kill()
        holder.wait(timeout=10)
