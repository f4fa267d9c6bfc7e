"""``ipop-switch lab demo``: what a newcomer runs first.

Builds a lab (by default three sites behind ``none``, ``easy`` and ``hard`` NATs),
shows how each NAT behaves, runs a GroupVPN node on every host, waits for the
links, then prints each node's status, a ping matrix over the overlay (IPv4 and
IPv6) and one iperf3 figure, and tears everything down (also on Ctrl-C).

With guests (``--guests N``, default 2) every node also gets N container namespaces
plugged into its overlay bridge (switch mode, ``[[overlay.attach]]`` in its config), and
the demo shows them reaching each other across the NATs.

Every node runs its DNS responder (``[overlay.dns]``): the demo shows each node's and
guest's name resolving from every node. Every node serves the overlay view
(``[node.web]``); with ``--keep`` the demo leaves the lab running and prints the first
node's page on this machine's loopback (``lab/webfwd.py``).
"""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console
from rich.table import Table

from ..progress import Stages, stage
from ..render import render_lab, render_status
from . import services
from .lab import Lab
from .nodes import WEB_PORT, LabGroup
from .probes import LINKS_TIMEOUT, first_ping, iperf, ping, wait_links
from .spec import LabSpec


def nat_probe(lab: Lab, host: str, port: int = 40000) -> dict:
    """Mapped addresses of ``host``'s port as seen by both STUN addresses of the core."""
    r = lab.exec(host, [sys.executable, "-m", "ipop_switch.lab.stunprobe", "probe", "--port", str(port),
                        f"{services.TURN_ADDR}:{services.TURN_PORT}", f"{services.STUN_ADDR2}:{services.TURN_PORT}"])
    return json.loads(r.stdout.splitlines()[0])


def describe_mapping(mapped: list) -> str:
    if not all(mapped):
        return "no answer (UDP blocked?)"
    if mapped[0] == mapped[1]:
        return "same port for both (endpoint-independent)"
    return "new port per destination (endpoint-dependent)"


def guest_address(node: int, j: int, v6: bool = False) -> str:
    """Guest ``j`` of node ``node`` (1-based): 100.99.(10+node).j/16, fd00:99::node:j/64."""
    return f"fd00:99::{node:x}:{j:x}/64" if v6 else f"100.99.{10 + node}.{j}/16"


def guest_tables(lab: Lab, host: str, node: int, n: int) -> list[dict]:
    """``[[overlay.attach]]`` tables for ``n`` container namespaces of ``host`` (made here)."""
    return [{"name": f"g{j}", "netns": lab.add_namespace(f"{host}g{j}"),
             "mac": f"02:99:00:00:{node:02x}:{j:02x}",
             "addresses": [guest_address(node, j), guest_address(node, j, True)]} for j in range(1, n + 1)]


def guest_matrix(lab: Lab, hosts: list[str], n: int, console: Console, result: dict) -> bool:
    """Every guest pings the first guest of every other node (IPv4 / IPv6)."""
    m = Table(title=f"guests ({n} per node, container namespaces on each node's bridge): "
                    "ping to every other node's first guest (ms; IPv4 / IPv6)")
    m.add_column("from guest")
    for i, h in enumerate(hosts, 1):
        m.add_column(f"{h}g1 {guest_address(i, 1).split('/')[0]}")
    ok = True
    result["guest_ping_ms"] = {}
    for i, a in enumerate(hosts, 1):
        for j in range(1, n + 1):
            stage(f"{a}g{j}")
            row = []
            for k, b in enumerate(hosts, 1):
                if k == i:
                    row.append("-")
                    continue
                dst = [guest_address(k, 1).split("/")[0], guest_address(k, 1, True).split("/")[0]]
                r4, r6 = (ping(lab, f"{a}g{j}", d) for d in dst)
                ok &= r4 is not None and r6 is not None
                result["guest_ping_ms"][f"{a}g{j}->{b}g1"] = [r4, r6]
                row.append(" / ".join(f"{r:.2f}" if r is not None else "[red]FAIL[/]" for r in (r4, r6)))
            m.add_row(f"{a}g{j} {guest_address(i, j).split('/')[0]}", *row)
    console.print(m)
    return ok


# asks one DNS server for one name (in a host's namespace, with the package's dnslib)
ASK = ("import sys, json; from dnslib import DNSRecord; "
       "q = DNSRecord.question(sys.argv[2], sys.argv[3]); "
       "r = DNSRecord.parse(q.send(sys.argv[1], 53, timeout=3)); print(json.dumps([str(x.rdata) for x in r.rr]))")


def resolve(lab: Lab, host: str, server: str, name: str, qtype: str = "A") -> list[str] | None:
    r = lab.exec(host, [sys.executable, "-c", ASK, server, name, qtype], check=False, timeout=20)
    try:
        return json.loads(r.stdout) if r.returncode == 0 else None
    except ValueError:
        return None


def responder(group: LabGroup, host: str) -> tuple[str, str]:
    """(loopback address, zone) of a node's DNS responder, as its status says."""
    dns = group.status(host)["overlays"][0]["dns"] or {}
    loop = next((a.rsplit(":", 1)[0] for a in dns.get("listen", []) if a.startswith("127.")), "127.0.0.1")
    return loop, dns.get("zone") or f"{group.name}.ipsw.internal"


def name_matrix(lab: Lab, group: LabGroup, guests: int, console: Console, result: dict) -> bool:
    """From every node, through its own responder (127.53.x.y), every node's name and its
    first guest's name: the answers, checked against the addresses they should be."""
    loop, zone = responder(group, next(iter(group.nodes)))
    hosts = list(group.nodes)
    names = [(f"{h}.{zone}", group.nodes[h].ip) for h in hosts]
    if guests:
        names += [(f"g1.{h}.{zone}", guest_address(group.nodes[h].index, 1).split("/")[0]) for h in hosts]
    t = Table(title=f"DNS names on the overlay: every node asks its own responder ({loop}:53)")
    t.add_column("name")
    for h in hosts:
        t.add_column(f"from {h}")
    ok = True
    result["names"] = {}
    for name, want in names:
        row = []
        for h in hosts:
            stage(f"{h}: {name}")
            got = resolve(lab, h, responder(group, h)[0], name)
            good = got == [want]
            ok &= good
            result["names"][f"{h}:{name}"] = got
            row.append(want if good else f"[red]{got or 'no answer'}[/]")
        t.add_row(name, *row)
    console.print(t)
    return ok


def run_demo(spec: LabSpec, *, console: Console, keep: bool = False, guests: int = 2) -> dict:
    t0 = time.monotonic()
    lab = Lab(spec, tied=not keep)       # --keep: the nodes outlive the demo (until 'lab down')
    result: dict = {}
    group: LabGroup | None = None
    # stage lines on a terminal: build, NATs, nodes, pings, names, (guests), iperf3, (teardown)
    stages = Stages(console, total=6 + bool(guests) + (not keep))
    try:
        with stages("building the lab (namespaces, NAT routers, Prosody, coturn) ..."):
            lab.up()
        console.print(f"[bold]lab {spec.name} up in {time.monotonic() - t0:.1f}s[/]")
        render_lab(lab.status(), console)
        t = Table(title="NAT behaviour seen from each host (STUN from local port 40000)")
        for col in ("host", "NAT", "mapped via 198.18.0.2", "mapped via 198.18.0.3", "mapping"):
            t.add_column(col)
        with stages("STUN from every host: how each NAT maps ...") as update:
            for i, (name, h) in enumerate(lab.hosts.items(), 1):
                update(f"{i}/{len(lab.hosts)} {name}")
                m = nat_probe(lab, name)["mapped"]
                fmt = lambda a: f"{a[0]}:{a[1]}" if a else "-"
                t.add_row(name, h.nat, fmt(m[0]), fmt(m[1]), describe_mapping(m))
        console.print(t)

        # port prediction off: the easy-hard pair stays on TURN, so the demo shows the relay
        # (with it the pair ends direct: 'ipop-switch bench --grid', docs/nat.md)
        group = LabGroup(lab, "demo", extra={"port_prediction": False})
        for i, h in enumerate(lab.hosts, 1):
            group.add(h, index=i, attach=guest_tables(lab, h, i, guests) if guests else None, dns=True, web=True)
        start = time.monotonic()
        with stages(f"starting {len(group.nodes)} GroupVPN nodes (ipop-switch up) and waiting for their links ..."):
            for h in group.nodes:
                group.start(h)
            hosts = list(group.nodes)
            fp = first_ping(lab, hosts[0], group.nodes[hosts[-1]].ip, timeout=LINKS_TIMEOUT)
            links = wait_links(group)
        result["first_ping_s"] = round(time.monotonic() - start if fp is None else fp, 2) if fp else None
        result["all_links_s"] = round(links, 2) if links else None
        console.print(f"first ping over the overlay {hosts[0]} -> {hosts[-1]}: "
                      + (f"[bold]{fp:.2f}s[/] after the agents started" if fp else "[red]none[/]")
                      + "; all links up: " + (f"[bold]{links:.2f}s[/]" if links else f"[red]not within {LINKS_TIMEOUT:.0f}s[/]"))
        for h in hosts:
            console.print(f"\n[bold]ipop-switch status[/] on {h} ({lab.host(h).nat}):")
            render_status(group.status(h), console)

        m = Table(title="ping matrix over the overlay (average RTT of 3 pings, ms; IPv4 / IPv6)")
        m.add_column("from \\ to")
        for h in hosts:
            m.add_column(f"{h} {group.nodes[h].ip}")
        ok = True
        result["ping_ms"] = {}
        with stages("pinging every pair over the overlay, IPv4 and IPv6 ...") as update:
            for a in hosts:
                row = []
                for b in hosts:
                    if a == b:
                        row.append("-")
                        continue
                    update(f"{a} -> {b}")
                    r4, r6 = ping(lab, a, group.nodes[b].ip), ping(lab, a, group.nodes[b].ip6)
                    ok &= r4 is not None and r6 is not None
                    result["ping_ms"][f"{a}->{b}"] = [r4, r6]
                    row.append(" / ".join(f"{r:.2f}" if r is not None else "[red]FAIL[/]" for r in (r4, r6)))
                m.add_row(a, *row)
        console.print(m)
        with stages("DNS: every node's name asked from every node ..."):
            ok &= name_matrix(lab, group, guests, console, result)
        if guests:
            with stages(f"guests: {guests} per node, pinging each other across the overlay ..."):
                ok &= guest_matrix(lab, hosts, guests, console, result)
        a, b = hosts[0], hosts[1]
        with stages(f"iperf3 {a} -> {b} over the overlay (5 s) ..."):
            mbit = iperf(lab, a, b, group.nodes[b].ip)
        result["iperf_mbit"] = round(mbit, 1) if mbit else None
        console.print(f"iperf3 TCP {a} -> {b} over the overlay: " + (f"[bold]{mbit:.0f} Mbit/s[/]" if mbit else "[red]failed[/]"))
        result["ok"] = bool(ok and links and mbit)
        console.print("[bold green]demo OK[/]" if result["ok"] else "[bold red]demo found problems (see above)[/]")
    finally:
        if keep:
            if group:
                show_web(lab, group, console, result)
            console.print(f"lab left up: 'ipop-switch lab down --name {spec.name}' removes it")
        else:
            with stages("stopping the nodes and tearing the lab down ..."):
                if group:
                    group.stop_all()
                lab.down()
            console.print(f"lab removed; total {time.monotonic() - t0:.1f}s")
    return result


def show_web(lab: Lab, group: LabGroup, console: Console, result: dict) -> None:
    """The first node's overlay view, on this machine's loopback, and how else to reach it."""
    from .webfwd import forward
    host = next(iter(group.nodes))
    fwd = forward(lab, host, WEB_PORT)
    inside = f"ip netns exec {lab.netns_of(host)} curl -s http://127.0.0.1:{WEB_PORT}/api/graph"
    if fwd is None:
        console.print(f"[yellow]overlay view: no free port on this machine's 127.0.0.1 for {host}'s page[/]; "
                      f"inside the lab: {inside}", highlight=False)
        return
    url, _ = fwd
    result["web_url"] = url
    port = url.rsplit(":", 1)[1].strip("/")
    console.print(f"\n[bold]overlay view[/] of {host} (the whole overlay, live): [bold]{url}[/]\n"
                  f"  open it in a browser on this machine; from another: ssh -L {port}:127.0.0.1:{port} root@<this machine>, "
                  f"then http://127.0.0.1:{port}/\n"
                  f"  (the page listens on 127.0.0.1:{WEB_PORT} in {host}'s namespace; a small forwarder carries it here)\n"
                  f"  the same data as JSON: {inside}", highlight=False)
    loop, zone = responder(group, host)
    other = list(group.nodes)[-1]
    console.print(f"[bold]names[/] from a node, through its responder: ipop-switch lab exec --name {lab.spec.name} {host} "
                  f"dig +short @{loop} {other}.{zone}", highlight=False)
