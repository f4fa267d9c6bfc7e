"""``ipop-switch lab demo``: what a newcomer runs first.

Until the overlay agent lands, the demo brings the lab up, shows its hosts and
services, probes each host's NAT (mapped addresses seen by two STUN addresses)
and checks that every host reaches the services, then tears everything down,
also on Ctrl-C.
"""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console
from rich.table import Table

from .lab import Lab
from .spec import LabSpec
from . import services


def nat_probe(lab: Lab, host: str, port: int = 40000) -> dict:
    """Mapped addresses of ``host``'s port as seen by both STUN addresses of the core."""
    r = lab.exec(host, [sys.executable, "-m", "ipop_switch.lab.stunprobe", "probe", "--port", str(port),
                        f"{services.TURN_ADDR}:{services.TURN_PORT}", f"{services.STUN_ADDR2}:{services.TURN_PORT}"])
    return json.loads(r.stdout.splitlines()[0])


def describe_mapping(mapped: list) -> str:
    if not all(mapped):
        return "no answer"
    if mapped[0] == mapped[1]:
        return "same port for both (endpoint-independent)"
    return "new port per destination (endpoint-dependent)"


def run_demo(spec: LabSpec, *, console: Console, keep: bool = False) -> None:
    from ..cli import _print_status
    t0 = time.monotonic()
    lab = Lab(spec)
    try:
        with console.status("building the lab (namespaces, NAT routers, Prosody, coturn) ..."):
            lab.up()
        console.print(f"[bold]lab {spec.name} up in {time.monotonic() - t0:.1f}s[/]")
        _print_status(lab.status())
        t = Table(title="NAT behaviour seen from each host (STUN from local port 40000)")
        for col in ("host", "NAT", "mapped via 198.18.0.2", "mapped via 198.18.0.3", "mapping", "XMPP reachable"):
            t.add_column(col)
        for name, h in lab.hosts.items():
            m = nat_probe(lab, name)["mapped"]
            xmpp = lab.exec(name, ["bash", "-c", f"exec 3<>/dev/tcp/{services.XMPP_ADDR}/{services.XMPP_PORT}"], check=False).returncode == 0
            fmt = lambda a: f"{a[0]}:{a[1]}" if a else "-"
            t.add_row(name, h.nat, fmt(m[0]), fmt(m[1]), describe_mapping(m), "yes" if xmpp else "NO")
        console.print(t)
        console.print("The overlay itself (agents, links, the OpenFlow switch) runs on top of this lab.")
    finally:
        if keep:
            console.print(f"lab left up: 'ipop-switch lab down --name {spec.name}' removes it")
        else:
            with console.status("tearing the lab down ..."):
                lab.down()
            console.print(f"lab removed; total {time.monotonic() - t0:.1f}s")
