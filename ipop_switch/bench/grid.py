"""``ipop-switch bench --grid``: every pair of NAT kinds in one lab, the path each pair ends
on and how long it takes (issue 19 item 6; Tailscale's natlab grid, with more rows).

One lab holds two sites of each kind (a pair of the same kind needs two sites) and two LAN
sites of two hosts each (one router hairpins, one does not). Pairs run one after the other
with fresh agents (``ipop-switch up``, a two-node GroupVPN of their own), so each pair's
figures are its own: started together at t0, the table shows

- **path**: what the link settled on, as ``status`` reports it: ``host`` (host to host),
  ``srflx`` (direct through a NAT mapping: srflx/prflx candidates), ``prediction`` (a port
  found by birthday probing, docs/nat.md), ``relay`` (TURN), ``peer-assisted`` (no link of
  its own, the frames go through a third member: only in the ``HELPED_CASES`` below), ``none``;
- **first frame**: seconds from t0 to the first ping answered over the overlay;
- **direct**: seconds from t0 until the link showed the final direct path, when it was
  relayed first (an upgrade or a predicted port), else the link's up time.

Rows are ``ROW_KINDS``; a kind is a function of the lab's site options (``KIND_SITES``). The
IPv6 underlay's rows: ``dual`` (IPv4 behind an easy NAT, IPv6 routed) and ``ipv6`` (IPv6 only,
behind a routed site's firewall); a path over IPv6 is marked ``v6`` in the table.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass

from rich.console import Console
from rich.table import Table

from ..errors import IpopError
from ..lab import Lab, LabSpec, SiteSpec
from ..lab.nodes import LabGroup
from ..lab.probes import first_ping

# kind -> SiteSpec options (name and hosts added per site). The rows of the grid.
KIND_SITES: dict[str, dict] = {
    "none": {"nat": "none"},
    "one2one": {"nat": "one2one"},
    "easy": {"nat": "easy"},
    "hard": {"nat": "hard"},
    "cgnat": {"nat": "easy", "cgnat": True},
    "udp_blocked": {"nat": "easy", "udp_blocked": True},
    "dual": {"nat": "easy", "ip": "dual"},
    "ipv6": {"nat": "easy", "ip": "v6"},
}
ROW_KINDS: list[str] = list(KIND_SITES)
# two hosts on one LAN, behind one router: hairpinning or not
LAN_CASES: dict[str, dict] = {"lan hairpin": {"nat": "easy", "hairpin": True},
                              "lan": {"nat": "easy"}}
SHORT = {"none": "n", "one2one": "o", "easy": "e", "hard": "h", "cgnat": "c", "udp_blocked": "u",
         "ipv6": "v", "dual": "d", "lan hairpin": "lh", "lan": "ln"}
# pairs with no direct path and no TURN server, plus a public third member linked to both:
# their frames cross it (peer-assisted traversal, docs/topology.md)
HELPED_CASES: dict[str, tuple[str, str]] = {"hard, no TURN, via a public member": ("hard", "hard")}
HELPER_HOST = "n1h1"
LINK_TIMEOUT = 30.0        # from start to the link up
SETTLE = 8.0               # a relayed link: how long to wait for a direct path after it is up


@dataclass
class PairResult:
    a: str                 # kind (or LAN case) of the first host
    b: str
    path: str              # host | srflx | prediction | relay | peer-assisted | none
    candidates: str | None
    first_frame_s: float | None
    up_s: float | None
    direct_s: float | None  # until the final direct path (None: never direct)
    first_path: str | None
    family: str | None = None  # the underlay of the final path: ipv4 | ipv6


def grid_spec(name: str = "grid") -> LabSpec:
    """Sites ``<s>1``/``<s>2`` per kind and one site per LAN case with two hosts."""
    sites = []
    for kind, opts in KIND_SITES.items():
        for i in (1, 2):
            sites.append(SiteSpec(name=f"{SHORT[kind]}{i}", **opts))
    for case, opts in LAN_CASES.items():
        sites.append(SiteSpec(name=SHORT[case], hosts=2, **opts))
    return LabSpec(name=name, sites=tuple(sites))


def pairs() -> list[tuple[str, str, str, str]]:
    """(kind a, kind b, host a, host b): every unordered pair of kinds, then the LAN cases."""
    out = []
    for ka, kb in itertools.combinations_with_replacement(ROW_KINDS, 2):
        out.append((ka, kb, f"{SHORT[ka]}1h1", f"{SHORT[kb]}{2 if ka == kb else 1}h1"))
    for case in LAN_CASES:
        out.append((case, case, f"{SHORT[case]}h1", f"{SHORT[case]}h2"))
    return out


def classify(peer: dict | None) -> str:
    """The path kind of one peer entry of ``status``."""
    if peer and peer.get("reach") == "peer-assisted":
        return "peer-assisted"
    if not peer or peer.get("state") != "up" or not peer.get("path"):
        return "none"
    if peer["path"] == "relay":
        return "relay"
    cands = peer.get("candidates") or ""
    if "prediction" in cands:
        return "prediction"
    return "host" if cands == "host->host" else "srflx"


def _peer(group: LabGroup, host: str, other: str) -> dict | None:
    """``host``'s status row for ``other`` (the pair may share the overlay with a helper)."""
    try:
        peers = group.status(host)["overlays"][0]["peers"]
        want = group.nodes[other].node_id
    except (IpopError, LookupError, OSError):
        return None
    return next((p for p in peers if p.get("node_id") == want), None)


def run_pair(lab: Lab, n: int, ka: str, kb: str, a: str, b: str, *, env: dict | None = None,
             helper: str | None = None) -> PairResult:
    """Two fresh agents on ``a`` and ``b`` (with ``helper``: a third one there and no TURN);
    the path they end on and the times."""
    # a UDP-blocked site reaches the TURN server over TCP only (as its user would configure)
    extra = {"no_turn": True} if helper else {"turn_transport": "tcp"} if "udp_blocked" in (ka, kb) else None
    group = LabGroup(lab, f"grid{n}", net=99, extra=extra)
    hosts = [a, b] + ([helper] if helper else [])
    for h in hosts:
        group.add(h)
    t0 = time.monotonic()
    for h in hosts:
        group.start(h, env=env)
    try:
        up_s = first_path = None
        peer = None
        deadline = t0 + LINK_TIMEOUT
        while time.monotonic() < deadline:
            peer = _peer(group, a, b)
            if classify(peer) != "none":
                up_s, first_path = time.monotonic() - t0, classify(peer)
                break
            time.sleep(0.1)
        ff = first_ping(lab, a, group.address(b, group.name), timeout=max(1.0, deadline + 5 - time.monotonic()))
        first_frame = None if ff is None else round(time.monotonic() - t0, 2)
        direct_s = up_s if first_path not in (None, "relay", "none") else None
        if first_path == "relay":
            end = time.monotonic() + SETTLE
            while time.monotonic() < end:
                peer = _peer(group, a, b)
                if classify(peer) not in ("relay", "none"):
                    direct_s = time.monotonic() - t0
                    break
                time.sleep(0.1)
        peer = _peer(group, a, b) or peer
        return PairResult(ka, kb, classify(peer), (peer or {}).get("candidates"), first_frame,
                          None if up_s is None else round(up_s, 2),
                          None if direct_s is None else round(direct_s, 2), first_path,
                          (peer or {}).get("family"))
    finally:
        group.stop_all()


def run_grid(*, console: Console, only: list[str] | None = None, env: dict | None = None,
             name: str = "grid") -> dict:
    """Every pair (or those whose kinds contain one of ``only``) in one lab."""
    todo = [p + (None,) for p in pairs()]
    todo += [(case, case, f"{SHORT[ka]}1h1", f"{SHORT[kb]}2h1", HELPER_HOST) for case, (ka, kb) in HELPED_CASES.items()]
    todo = [p for p in todo if not only or any(o in f"{p[0]}-{p[1]}" for o in only)]
    results = []
    with Lab(grid_spec(name)) as lab:
        for n, (ka, kb, a, b, helper) in enumerate(todo, 1):
            r = run_pair(lab, n, ka, kb, a, b, env=env, helper=helper)
            console.print(f"{ka:>12} - {kb:<12} {r.path:<11} first frame {r.first_frame_s}s  direct {r.direct_s}s")
            results.append(r)
    return {"pairs": [asdict(r) for r in results]}


def print_grid(report: dict, console: Console) -> None:
    """The grid as a matrix (path and first-frame time per pair) and the LAN cases below it."""
    by = {(p["a"], p["b"]): p for p in report["pairs"]}
    kinds = [k for k in ROW_KINDS if any(k in (p["a"], p["b"]) for p in report["pairs"])]
    t = Table(title="NAT grid: path, time to first frame (s) [time to direct, when later]")
    t.add_column("")
    for k in kinds:
        t.add_column(k)

    def cell(p: dict | None) -> str:
        if p is None:
            return ""
        v6 = " v6" if p.get("family") == "ipv6" else ""
        s = f"{p['path']}{v6} {p['first_frame_s'] if p['first_frame_s'] is not None else '-'}"
        if p["direct_s"] is not None and p["first_path"] == "relay":
            s += f" [{p['direct_s']}]"
        return s

    for ka in kinds:
        t.add_row(ka, *[cell(by.get((ka, kb)) or by.get((kb, ka))) for kb in kinds])
    if kinds:
        console.print(t)
    for case in [*LAN_CASES, *HELPED_CASES]:
        p = by.get((case, case))
        if p:
            console.print(f"{case}: {cell(p)} ({p['candidates']})")
