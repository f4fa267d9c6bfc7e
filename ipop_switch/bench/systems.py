"""ipop-switch itself as a benchmarked system: agents run as users run them (``ipop-switch up``
with signaling, the switch app, OVS and tunnel workers), measured over the full path
app -> OVS bridge -> worker -> wire -> worker -> OVS bridge -> app."""

from __future__ import annotations

import time
from pathlib import Path

from ..lab import Lab, LabSpec, SiteSpec
from ..lab.probes import first_ping, wait_links
from ..lab.nodes import LabGroup
from . import turn_limit
from .measure import agent_pids, iperf3
from .peers import BenchError, System
from .social import IpopSocial

SETUP_TIMEOUT = 60.0


def node_pids(group: LabGroup, host: str) -> list[int]:
    """The agent and every process it started: workers, switch app, ovsdb-server, ovs-vswitchd."""
    node = group.nodes[host]
    return agent_pids(node.proc, node.dir)


class GuestView(System):
    """The same two ipop-switch nodes, measured between one guest (a container namespace on
    each node's bridge, switch mode) and the other: the path gains a veth hop each end and
    the guest's own stack, nothing else. Starts and stops nothing itself; CPU is charged
    to the nodes' processes as for host-to-host."""

    hosts: tuple[str, str] = ("", "")
    light = True             # measured in the interleaved rounds only (no flood, no variants)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class IpopSwitch(System):
    """Two ipop-switch nodes between the bench hosts, each with one guest (``guests``)."""

    group_extra: dict | None = None      # LabGroup options (e.g. the relayed variant: no port prediction)

    def start(self) -> None:
        self.group = LabGroup(self.lab, "bench", net=96, extra=self.group_extra)
        guests = []
        for i, h in enumerate((self.a, self.b), 1):
            ns = f"{h}bg"
            self.lab.add_namespace(ns)
            guests.append(ns)
            self.group.add(h, index=i, attach=[{"name": "g1", "netns": self.lab.netns_of(ns),
                                                "mac": f"02:96:00:00:{i:02x}:01",
                                                "addresses": [f"100.96.{10 + i}.1/16"]}])
        t0 = time.monotonic()
        for h in (self.a, self.b):
            self.group.start(h)
        self.addr_a, self.addr_b = self.group.nodes[self.a].ip, self.group.nodes[self.b].ip
        took = first_ping(self.lab, self.a, self.addr_b, timeout=SETUP_TIMEOUT)
        if took is None:
            raise BenchError("ipop-switch link did not come up")
        self.setup_s = time.monotonic() - t0
        if wait_links(self.group, timeout=SETUP_TIMEOUT) is None:
            raise BenchError("ipop-switch status does not show the link up")
        self.pids_a = node_pids(self.group, self.a)
        self.pids_b = node_pids(self.group, self.b)
        self.guests = GuestView(f"{self.name} guest-to-guest", self.lab, self.a, self.b, self.dir,
                                addr_a="100.96.11.1", addr_b="100.96.12.1", pids_a=self.pids_a, pids_b=self.pids_b)
        self.guests.hosts = tuple(guests)
        if first_ping(self.lab, guests[0], self.guests.addr_b, timeout=SETUP_TIMEOUT) is None:
            raise BenchError("ipop-switch: the guests do not reach each other")

    def stop(self) -> None:
        self.group.stop_all()
        super().stop()

    def outer_udp_ok(self) -> bool:
        st = self.group.status(self.a)["overlays"][0]["peers"][0]
        return st.get("path") in ("direct", "relay") and st.get("tx_bytes", 0) > 0

    def extra_results(self, lab: Lab) -> dict:
        st = self.group.status(self.a)["overlays"][0]["peers"][0]
        return {"setup_s": round(self.setup_s, 2), "path": st.get("path")}


def variant_throughput(kind: str, *, seconds: float, workdir: Path) -> dict:
    """TCP 1 stream over a TURN-relayed path (easy <-> hard) or at 1% loss each way."""
    sites = {"relay": (SiteSpec("e", "easy"), SiteSpec("h", "hard")),
             "loss1": (SiteSpec("p", "none", loss=1.0), SiteSpec("q", "none", loss=1.0))}[kind]
    lab = Lab(LabSpec(name=f"bv{kind[:4]}{int(time.time()) % 1000}", sites=sites))
    sysm = None
    try:
        lab.up()
        a, b = list(lab.hosts)
        sysm = IpopSwitch("ipop-switch", lab, a, b, workdir / kind)
        if kind == "relay":     # the relayed path itself: without prediction hard<->easy ends direct
            sysm.group_extra = {"port_prediction": False}
        sysm.start()
        path = sysm.extra_results(lab)["path"]
        out = {"path": path, "setup_s": round(sysm.setup_s, 2)}
        if kind != "relay":
            out["mbit"] = round(iperf3(lab, a, b, sysm.addr_b, streams=1, seconds=seconds).mbit, 1)
            return out
        out.update(_relayed(lab, sysm, seconds))
        # again with coturn scheduled first, as on a machine of its own (turn_limit.schedule_first)
        try:
            turn_limit.schedule_first(lab.services()["turn"]["pid"])
        except (OSError, KeyError, TypeError) as e:
            out["first_error"] = f"coturn not made real-time: {e}"[:200]
            return out
        out["first"] = _relayed(lab, sysm, seconds)
        return out
    finally:
        if sysm:
            sysm.stop()
        lab.down()


def _relayed(lab: Lab, sysm: "IpopSwitch", seconds: float) -> dict:
    """TCP 1 stream over the relayed link both ways, and what coturn itself relays each way
    here (turn_limit.py), from the end that holds the allocation (the hard NAT's, as ICE
    picks it)."""
    a, b = sysm.a, sysm.b
    out: dict = {"mbit": round(iperf3(lab, a, b, sysm.addr_b, streams=1, seconds=seconds).mbit, 1),
                 "mbit_reverse": round(iperf3(lab, b, a, sysm.addr_a, streams=1, seconds=seconds).mbit, 1)}
    cand_b = sysm.group.status(b)["overlays"][0]["peers"][0].get("candidates") or ""
    client, peer = (b, a) if cand_b.startswith("relay") else (a, b)
    to_b, from_b = ("to-client", "from-client") if client == b else ("from-client", "to-client")
    try:
        lim = turn_limit.measure(lab, client, peer, directions=("to-client", "from-client"),
                                 seconds=min(3.0, seconds))
        out["limit_mbit"] = lim[to_b]["mbit"]               # the direction of a -> b
        out["limit_reverse_mbit"] = lim[from_b]["mbit"]
    except RuntimeError as e:       # a note, not the end of the bench
        out["limit_error"] = str(e)[:200]
    return out


def available() -> dict[str, type[System]]:
    return {"ipop-switch": IpopSwitch, "ipop-switch social": IpopSocial}
