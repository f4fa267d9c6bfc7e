"""The lab: real Prosody and coturn, nftables NATs with the expected behaviours, clean teardown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from conftest import helper, unique_name
from helpers.wait import readline_within
from ipop_switch import proc
from ipop_switch.lab import Lab, LabSpec, SiteSpec, list_namespaces
from ipop_switch.lab.lab import STATE_ROOT
from ipop_switch.lab.services import make_lab_ca, STUN_ADDR2, TURN_ADDR, TURN_PORT, XMPP_ADDR

PROBE = [sys.executable, "-m", "ipop_switch.lab.stunprobe"]
STUN1, STUN2 = f"{TURN_ADDR}:{TURN_PORT}", f"{STUN_ADDR2}:{TURN_PORT}"


def probe(lab: Lab, host: str, port: int, *servers: str) -> list:
    out = lab.exec(host, PROBE + ["probe", "--port", str(port), *servers], timeout=20).stdout
    return [tuple(m) if m else None for m in json.loads(out.splitlines()[0])["mapped"]]


def listen_then(lab: Lab, host: str, port: int, send_from: list[tuple[str, list[str]]], wait: float = 1.5) -> tuple:
    """Probe from ``host``:``port`` via STUN1 only, then have others send to the mapping;
    return (mapping, payloads received)."""
    p = lab.popen(host, PROBE + ["probe", "--port", str(port), "--wait", str(wait), STUN1],
                  stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(readline_within(p.stdout, 15, f"the STUN probe on {host}") or "null")
        assert first, f"the STUN probe on {host} printed nothing"
        mapped = first["mapped"][0]
        assert mapped, "no STUN answer"
        for sender, extra in send_from:
            lab.exec(sender, PROBE + ["send", *extra, f"{mapped[0]}:{mapped[1]}", f"from-{sender}"])
        rest = p.communicate(timeout=wait + 10)[0]
    finally:
        p.kill()
    return tuple(mapped), [json.loads(l)["data"] for l in rest.splitlines() if l.strip()]


@pytest.fixture(scope="module")
def natlab():
    """One lab with every NAT kind (and a hairpinning two-host site, a CGNAT site)."""
    spec = LabSpec(name=unique_name("m"), sites=(
        SiteSpec("pub", "none"),
        SiteSpec("one", "one2one", hosts=2, hairpin=True),
        SiteSpec("easy", "easy", hosts=2, hairpin=True),
        SiteSpec("hard", "hard"),
        SiteSpec("nohp", "easy", hosts=2),
        SiteSpec("cg", "easy", cgnat=True),
    ))
    lab = Lab(spec)
    try:
        yield lab.up()
    finally:
        lab.down()


def test_xmpp_tls_login_with_lab_ca(natlab):
    h = natlab.host("easyh1")
    ca = str(natlab.ca_cert)
    ok = json.loads(natlab.exec("easyh1", helper("xmpp_login") + [f"{h.xmpp_user}@ipsw.test", h.xmpp_password, XMPP_ADDR, ca]).stdout)
    assert ok == {"ok": True, "error": "", "tls": True}
    bad = json.loads(natlab.exec("easyh1", helper("xmpp_login") + [f"{h.xmpp_user}@ipsw.test", "wrong", XMPP_ADDR, ca]).stdout)
    assert bad == {"ok": False, "error": "auth"}
    # a CA that did not sign the server certificate: TLS refused
    make_lab_ca(natlab.dir / "other-ca")
    other = str(natlab.dir / "other-ca" / "ca.crt")
    untrusted = json.loads(natlab.exec("easyh1", helper("xmpp_login") + [f"{h.xmpp_user}@ipsw.test", h.xmpp_password, XMPP_ADDR, other]).stdout)
    assert untrusted["ok"] is False and untrusted["error"] != "auth", untrusted


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_turn_allocation_and_stun(natlab, transport):
    s = natlab.services()["turn"]
    out = natlab.exec("hardh1", helper("turn_alloc") + [s["address"], str(s["port"]), s["user"], s["password"], transport]).stdout
    kinds = {c["type"] for c in json.loads(out)["candidates"]}
    assert "relay" in kinds, out
    assert "srflx" in kinds, out
    relay = [c for c in json.loads(out)["candidates"] if c["type"] == "relay"][0]
    assert relay["host"] == TURN_ADDR
    alloc = json.loads(out)["allocation"]
    assert alloc["ok"] and alloc["relayed"][0] == TURN_ADDR, alloc


def test_turn_refuses_wrong_password(natlab):
    s = natlab.services()["turn"]
    out = natlab.exec("hardh1", helper("turn_alloc") + [s["address"], str(s["port"]), s["user"], "wrong", "udp"]).stdout
    got = json.loads(out)
    kinds = {c["type"] for c in got["candidates"]}
    assert "srflx" in kinds, got                  # the helper ran and reached the server (STUN answered) ...
    assert "relay" not in kinds, got              # ... which refused the allocation ...
    assert got["allocation"]["ok"] is False and got["allocation"]["code"] == 401, got   # ... for the credentials


def test_none_and_one2one_map_to_public_address_with_stable_port(natlab):
    for host in ("pubh1", "oneh1", "oneh2"):
        h = natlab.host(host)
        m = probe(natlab, host, 41000, STUN1, STUN2)
        assert m == [(h.public_ip, 41000), (h.public_ip, 41000)], (host, m)
    assert natlab.host("oneh1").public_ip != natlab.host("oneh2").public_ip


def test_easy_keeps_one_mapping_for_both_destinations(natlab):
    m = probe(natlab, "easyh1", 41001, STUN1, STUN2)
    assert m[0] == m[1] and m[0][0] == natlab.host("easyh1").public_ip


def test_hard_maps_each_destination_to_a_new_port(natlab):
    m = probe(natlab, "hardh1", 41002, STUN1, STUN2)
    assert m[0][0] == m[1][0] == natlab.host("hardh1").public_ip
    assert m[0][1] != m[1][1]


def test_cgnat_maps_to_carrier_address(natlab):
    m = probe(natlab, "cgh1", 41003, STUN1, STUN2)
    assert m[0] == m[1] and m[0][0] == natlab.host("cgh1").public_ip
    assert natlab.host("cgh1").nat == "easy+cgnat"


def test_easy_filters_unsolicited_but_one2one_does_not(natlab):
    # from an address the host never contacted (the second STUN address) and from another site
    senders = [("core", ["--src", f"{STUN_ADDR2}:5000"]), ("pubh1", [])]
    _, got = listen_then(natlab, "easyh1", 41004, senders)
    assert got == []
    _, got = listen_then(natlab, "oneh1", 41004, senders)
    assert sorted(got) == ["from-core", "from-pubh1"]
    # the contacted server address itself, from its own port, does get through (the mapping works)
    _, got = listen_then(natlab, "easyh1", 41005, [("core", ["--src", f"{TURN_ADDR}:5001"])])
    assert got == []  # port-dependent: same address, other port is filtered too


def test_hairpinning_on_and_off(natlab):
    _, got = listen_then(natlab, "easyh1", 41006, [("easyh2", [])])
    assert got == ["from-easyh2"]
    _, got = listen_then(natlab, "oneh1", 41006, [("oneh2", [])])
    assert got == ["from-oneh2"]
    _, got = listen_then(natlab, "nohph1", 41006, [("nohph2", [])])
    assert got == []


def test_no_route_from_root_namespace_into_the_lab(natlab):
    """The root namespace has no interface, address or route of the lab (nothing is sent to check it:
    a lab address from the root namespace would go to the machine's default route, outside)."""
    links = proc.run(["ip", "-o", "link"]).stdout
    assert "link-netns ipsw-" not in links and not any("@if" in l and "ipsw" in l for l in links.splitlines())
    assert "198.18." not in proc.run(["ip", "-4", "addr"]).stdout
    routes = proc.run(["ip", "route"]).stdout + proc.run(["ip", "route", "show", "table", "all"]).stdout
    assert "198.18." not in routes and "100.64." not in routes and "100.100." not in routes


def test_loss_and_udp_blocked(lab_factory):
    lab = lab_factory(LabSpec(name=unique_name(), sites=(
        SiteSpec("lossy", "easy", loss=50.0), SiteSpec("noudp", "easy", udp_blocked=True), SiteSpec("pubu", "none", udp_blocked=True))))
    r = lab.exec("lossyh1", ["ping", "-q", "-c", "60", "-i", "0.01", "-W", "1", TURN_ADDR], check=False, timeout=30)
    received = int(r.stdout.split(" received")[0].split()[-1])
    assert 5 <= received <= 45, r.stdout          # about 25% of round trips survive 50% each way
    for host in ("noudph1", "pubuh1"):
        assert probe(lab, host, 41010, STUN1) == [None]
        assert lab.exec(host, ["ping", "-c", "1", "-W", "2", TURN_ADDR], check=False).returncode == 0  # ICMP still flows
    s = lab.services()["turn"]
    out = lab.exec("noudph1", helper("turn_alloc") + [s["address"], str(s["port"]), s["user"], s["password"], "tcp"]).stdout
    assert "relay" in {c["type"] for c in json.loads(out)["candidates"]}, out
    assert json.loads(out)["allocation"]["ok"], out



_GSO_RX = """
import collections, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(3.0)
print("ready", flush=True)
got = collections.Counter()
try:
    for _ in range(100000):
        got[s.recv(2048)[0]] += 1
except socket.timeout:
    pass
print(" ".join(f"{k}:{v}" for k, v in sorted(got.items())), flush=True)
"""

_GRO_RX = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.setsockopt(17, 104, 1)                                   # UDP_GRO
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(3.0)
print("ready", flush=True)
reads, datagrams = 0, 0
try:
    for _ in range(100000):
        data, anc, _, _ = s.recvmsg(65535, socket.CMSG_SPACE(2))
        seg = next((int.from_bytes(d[:2], "little") for l, t, d in anc if (l, t) == (17, 104)), len(data))
        reads, datagrams = reads + 1, datagrams + -(-len(data) // seg)
except socket.timeout:
    pass
print(f"{reads} {datagrams}", flush=True)
"""

_GSO_TX = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for b in range(20):       # 20 bursts of 40 datagrams of 1000 bytes, one UDP GSO sendmsg each
    s.sendmsg([bytes([b]) * 40000], [(17, 103, (1000).to_bytes(2, "little"))], 0, (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.02)
"""


def test_lossy_sites_segment_udp_gso_bursts_so_loss_is_per_datagram(lab_factory):
    """In a lab with loss, hosts' uplinks (and the core's port towards a lossy site) have UDP
    GSO off: a 40-datagram burst into the lossy host loses single datagrams, not all 40. After
    the loss the lossy host's eth0 aggregates again (GRO), as a NIC would."""
    lab = lab_factory(LabSpec(name=unique_name(), sites=(
        SiteSpec("lp", "none", loss=50.0), SiteSpec("le", "one2one", loss=1.0), SiteSpec("ok", "none"))))

    def feature(host_or_ns: str, dev: str, *, ns: bool = False) -> str:
        argv = ["ethtool", "-k", dev]
        out = (proc.run(argv, netns=host_or_ns) if ns else lab.exec(host_or_ns, argv)).stdout
        return next(l.split(":")[1].split()[0] for l in out.splitlines() if l.startswith("tx-udp-segmentation:"))

    assert feature("lph1", "eth0") == "off" and feature("leh1", "eth0") == "off"
    assert feature("okh1", "eth0") == "off"                    # in a lossy lab every host segments
    assert feature(lab.core_ns, "s1h1", ns=True) == "off"            # towards the lossy public host
    def bursts(src: str, dst: str, port: int, rx_code: str = _GSO_RX) -> str:
        """What the receiver ``rx_code`` prints after 20 GSO bursts of 40 datagrams from src to dst."""
        rx = lab.popen(dst, [sys.executable, "-c", rx_code, str(port)], stdout=subprocess.PIPE, text=True)
        try:
            assert readline_within(rx.stdout, 10, f"the receiver on {dst}").strip() == "ready"
            lab.exec(src, [sys.executable, "-c", _GSO_TX, lab.host(dst).public_ip, str(port)], timeout=30)
            out, _ = rx.communicate(timeout=30)
        finally:
            if rx.poll() is None:
                rx.kill()
                rx.wait(timeout=10)
        return out

    # into the lossy host, and (the rule sits in the core) out of it
    for src, dst, port in (("okh1", "lph1", 41500), ("lph1", "okh1", 41501)):
        counts = [int(kv.split(":")[1]) for kv in bursts(src, dst, port).split()]
        assert counts, (src, dst)
        assert sum(counts) < 20 * 40 * 0.8, counts                 # the 50 % loss applied ...
        assert any(0 < c < 40 for c in counts), counts             # ... per datagram: bursts arrive partly
    # GRO at the lossy host after the loss: at 50 % it still loses, and joins what survives ...
    reads, datagrams = map(int, bursts("okh1", "lph1", 41502, _GRO_RX).split())
    assert 0 < reads < datagrams < 20 * 40 * 0.8, (reads, datagrams)
    # ... and behind a 1 % router most of a burst arrives in one read (a loss ends a run)
    reads, datagrams = map(int, bursts("okh1", "leh1", 41503, _GRO_RX).split())
    assert 0 < reads * 3 < datagrams, (reads, datagrams)


def _lab_leftovers(name: str) -> list[str]:
    left = [ns for ns in list_namespaces() if ns.startswith(f"ipsw-{name}-")]
    pids = subprocess.run(["pgrep", "-f", f"/run/ipop-switch/lab/{name}/"], capture_output=True, text=True).stdout.split()
    left += [f"pid {p}" for p in pids if proc.alive(int(p))]
    if (STATE_ROOT / name).exists():
        left.append(str(STATE_ROOT / name))
    return left


def test_cli_up_status_exec_down(tmp_path):
    name = unique_name("c")
    cli = [sys.executable, "-m", "ipop_switch.cli"]
    try:
        r = subprocess.run(cli + ["lab", "up", "--name", name, "--sites", "3", "--nat", "none,easy,hard"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        st = json.loads(subprocess.run(cli + ["lab", "status", "--name", name, "--json"], capture_output=True, text=True).stdout)
        assert [h["nat"] for h in st["hosts"]] == ["none", "easy", "hard"]
        assert all(s["running"] for s in st["services"].values())
        r = subprocess.run(cli + ["lab", "exec", "--name", name, "s2h1", "ip", "-4", "-o", "addr", "show", "eth0"],
                           capture_output=True, text=True, timeout=20)
        assert "100.64.2.11/24" in r.stdout
        r = subprocess.run(cli + ["lab", "up", "--name", name], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and r.stderr.startswith("ipop-switch: error: lab") and "Traceback" not in r.stderr
    finally:
        subprocess.run(cli + ["lab", "down", "--name", name], capture_output=True, timeout=60)
    assert _lab_leftovers(name) == []


def test_down_after_killed_run_leaves_nothing():
    name = unique_name("k")
    code = (
        "import os, signal\n"
        "from ipop_switch.lab import Lab, LabSpec\n"
        f"Lab(LabSpec.from_flags(name={name!r}, sites=2, nat='easy,hard')).up()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert r.returncode == -signal.SIGKILL
    assert _lab_leftovers(name), "the killed run should have left its lab behind"
    other = Lab(LabSpec.from_flags(name=unique_name("o"), sites=1, nat="easy")).up()  # must survive
    try:
        r = subprocess.run([sys.executable, "-m", "ipop_switch.cli", "lab", "down", "--name", name],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert _lab_leftovers(name) == []
        assert other.status()["services"]["xmpp"]["running"]
        assert all(ns in list_namespaces() for ns in other.namespaces)
    finally:
        other.down()


def test_lab_spec_errors_name_the_field(tmp_path):
    from ipop_switch.lab.spec import LabSpecError
    bad = tmp_path / "lab.toml"
    bad.write_text('[[site]]\nname = "a"\nnat = "full-cone"\n')
    with pytest.raises(LabSpecError, match="nat 'full-cone' is not one of"):
        LabSpec.from_toml(bad)
    bad.write_text('[[site]]\nname = "a"\nhosts = "two"\n')
    with pytest.raises(LabSpecError, match=r"site\[0\].hosts"):
        LabSpec.from_toml(bad)
    good = tmp_path / "good.toml"
    good.write_text('name = "x"\n[[site]]\nname = "a"\nnat = "hard"\nhosts = 2\n[[site]]\nnat = "none"\n')
    spec = LabSpec.from_toml(good)
    assert [s.name for s in spec.sites] == ["a", "s2"] and spec.sites[0].hosts == 2
    r = subprocess.run([sys.executable, "-m", "ipop_switch.cli", "lab", "up", "-c", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
