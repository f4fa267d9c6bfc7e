"""The SocialVPN path as a benchmarked system (docs/social.md), beside the GroupVPN path
(``systems.IpopSwitch``) between the same two bench hosts, and the comparison of the two.

Two users' nodes, each in its own XMPP account on the lab's Prosody, made friends through
their agents as the CLI does it (a subscription asked and accepted). Both use the SAME own
address, so every frame is translated on arrival (OpenFlow set-field on the friend's port):
the measured path is the one a SocialVPN user has. The iperf3 server on b binds b's own
address; a sends to the address a's node assigned b.

The nodes run on the second host of each of the GroupVPN pair's two sites: the same underlay
path (the same site networks, the same public segment), and their own agents. Not the very
same hosts: the private OVS of a second agent in one network namespace cannot create its
bridge (the userspace datapath's tap device has one fixed name per namespace), and one agent
with both overlays would change the GroupVPN row (its RSS, its idle work).
"""

from __future__ import annotations

import time

from .. import proc
from ..errors import IpopError
from ..lab.probes import first_ping
from ..lab.social import SocialLabNode, befriend
from .measure import agent_pids
from .peers import BenchError, System

OVERLAY = "bsoc"
OWN = "100.95.0.1"           # both nodes' own address (from 100.64/10; apart from the other systems' nets)
USERS = ("svpna", "svpnb")   # the two XMPP accounts (one user per bench host)
DEVICE = "bench"             # each user's node name (its XMPP resource)
SETUP_TIMEOUT = 60.0
RTT_TARGET_MS = 0.05         # the targets: social within 10 % throughput and 0.05 ms RTT of group
TCP_TARGET = 0.90


class IpopSocial(System):
    """Two SocialVPN nodes (users svpna on a, svpnb on b) that are friends; measured a -> b."""

    def start(self) -> None:
        self.a, self.b = (site_mate(self.lab, h) for h in (self.a, self.b))
        self.hosts = (self.a, self.b)
        base = self.dir.with_name(self.dir.name.replace(" ", "-"))    # no space in OVS's paths
        self.nodes = [SocialLabNode(self.lab, h, base / u, u, DEVICE, f"{OWN}/16", overlay=OVERLAY)
                      for h, u in zip((self.a, self.b), USERS)]
        na, nb = self.nodes
        t0 = time.monotonic()
        for n in self.nodes:
            n.write()
            n.start()
        try:
            for n in self.nodes:
                self._wait(lambda n=n: n.status()["signaling"]["state"] == "online", f"{n.host}'s agent online")
            befriend(na, nb, timeout=SETUP_TIMEOUT)
            self._wait(lambda: na.node_of(nb).get("state") == "linked" == nb.node_of(na).get("state"),
                       "the friends' nodes linked")
        except IpopError as e:
            raise BenchError(f"ipop-switch social: {e}{self._log_tail()}") from None
        self.addr_b, self.bind_b = na.node_of(nb)["address"], OWN     # a's view of b; b's own
        self.addr_a = nb.node_of(na)["address"]
        if first_ping(self.lab, self.a, self.addr_b, timeout=SETUP_TIMEOUT) is None:
            raise BenchError("ipop-switch social: the friends do not reach each other")
        self.setup_s = time.monotonic() - t0
        self.pids_a, self.pids_b = (agent_pids(n.proc, n.dir) for n in self.nodes)

    def _log_tail(self, lines: int = 8) -> str:
        """The agents' last log lines, for an error that ends the bench (its files are removed)."""
        out = []
        for n in self.nodes:
            try:
                tail = (n.dir / "agent.log").read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"\n  {n.host}'s agent.log:\n    " + "\n    ".join(tail))
        return "".join(out)

    def stop(self) -> None:
        for n in getattr(self, "nodes", []):
            n.stop()
        super().stop()

    @staticmethod
    def _wait(cond, what: str) -> None:
        def ok() -> bool:
            try:
                return bool(cond())
            except (IpopError, LookupError):
                return False             # an agent still starting
        proc.wait_for(ok, timeout=SETUP_TIMEOUT, interval=0.25, what=what)

    # -- what the bench asks every system -----------------------------------------------------
    def outer_udp_ok(self) -> bool:
        na, nb = self.nodes
        n = na.node_of(nb)
        peer = next((p for p in na.status()["peers"] if p["node_id"] == n.get("node_id")), {})
        return n.get("path") in ("direct", "relay") and peer.get("tx_bytes", 0) > 0

    def extra_results(self, lab) -> dict:
        na, nb = self.nodes
        return {"setup_s": round(self.setup_s, 2), "path": na.node_of(nb).get("path"),
                "translated": (nb.status().get("switch") or {}).get("social_translated")}


def site_mate(lab, host: str) -> str:
    """Another host of ``host``'s site (the bench lab has two per site when this row is measured)."""
    site = lab.host(host).site
    mate = next((h for h, info in sorted(lab.hosts.items()) if info.site == site and h != host), None)
    if mate is None:
        raise BenchError(f"ipop-switch social: site {site} has no second host (the bench lab makes one for this row)")
    return mate


def social_vs_group(res: dict) -> dict | None:
    """SocialVPN against GroupVPN between the same hosts: throughput ratios (medians), the RTT
    difference in ms, and whether the issue's targets hold. None without both measured."""
    soc, grp = res.get("ipop-switch social"), res.get("ipop-switch")
    if not soc or not grp:
        return None
    out: dict = {}
    for key in ("tcp1_mbit", "tcp4_mbit"):
        if soc[key] and grp[key] and grp[key]["median"]:
            out[key.replace("_mbit", "_ratio")] = round(soc[key]["median"] / grp[key]["median"], 3)
    if soc["ping_ms"] and grp["ping_ms"]:
        out["ping_ms"] = {"social": soc["ping_ms"], "group": grp["ping_ms"],
                          "diff": round(soc["ping_ms"] - grp["ping_ms"], 3)}
    ratios = [v for k, v in out.items() if k.endswith("_ratio")]
    out["within_target"] = bool(ratios and "ping_ms" in out and min(ratios) >= TCP_TARGET
                                and out["ping_ms"]["diff"] <= RTT_TARGET_MS)
    return out


def social_line(cmp: dict | None) -> str | None:
    """One line for the table's foot."""
    if not cmp:
        return None
    parts = [f"TCP {label} [bold]{cmp[k]:.2f}x[/]" for k, label in (("tcp1_ratio", "1 stream"), ("tcp4_ratio", "4 streams"))
             if k in cmp]
    if "ping_ms" in cmp:
        p = cmp["ping_ms"]
        parts.append(f"RTT {p['social']:.3f} vs {p['group']:.3f} ms ({p['diff']:+.3f})")
    verdict = "[green]met[/]" if cmp["within_target"] else "[red]NOT met[/]"
    return (f"ipop-switch social / ipop-switch (SocialVPN with translation / GroupVPN, same sites): {', '.join(parts)}; "
            f"target >= {TCP_TARGET:.2f}x and <= +{RTT_TARGET_MS} ms: {verdict}")
