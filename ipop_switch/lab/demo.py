"""``ipop-switch lab demo``: what a newcomer runs first.

Builds a lab (by default three sites behind ``none``, ``easy`` and ``hard`` NATs),
shows how each NAT behaves, runs a GroupVPN node on every host, waits for the
links, then prints each node's status, a ping matrix over the overlay (IPv4 and
IPv6) and one iperf3 figure, and tears everything down (also on Ctrl-C).

With guests (``--guests N``, default 2) every node also gets N container namespaces
plugged into its overlay bridge (switch mode, ``[[overlay.attach]]`` in its config), and
the demo shows them reaching each other across the NATs.
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
from .nodes import LabGroup
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


def run_demo(spec: LabSpec, *, console: Console, keep: bool = False, guests: int = 2) -> dict:
    t0 = time.monotonic()
    lab = Lab(spec)
    result: dict = {}
    group: LabGroup | None = None
    # stage lines on a terminal: build, NATs, nodes, pings, (guests), iperf3, (teardown)
    stages = Stages(console, total=5 + bool(guests) + (not keep))
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

        group = LabGroup(lab, "demo")
        for i, h in enumerate(lab.hosts, 1):
            group.add(h, index=i, attach=guest_tables(lab, h, i, guests) if guests else None)
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
            console.print(f"lab left up: 'ipop-switch lab down --name {spec.name}' removes it")
        else:
            with stages("stopping the nodes and tearing the lab down ..."):
                if group:
                    group.stop_all()
                lab.down()
            console.print(f"lab removed; total {time.monotonic() - t0:.1f}s")
    return result
