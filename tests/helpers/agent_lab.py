"""Checks on real agents (``ipop-switch up``) run by a LabGroup: their status, their
processes and the devices they made, all found from what belongs to one node (its pid
file, its OVS run directory, its children), never machine-wide."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from helpers.wait import wait_until
from ipop_switch import proc
from ipop_switch.lab import Lab
from ipop_switch.lab.nat import host_udp_drop_ruleset
from ipop_switch.lab.nodes import LabGroup

T = TypeVar("T")
CLI = [sys.executable, "-m", "ipop_switch.cli"]


def until(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """``wait_until`` for agents: any exception counts as "not yet" (an agent still starting
    has no status socket, a status without the peer yet raises LookupError, ...)."""
    return wait_until(pred, timeout, what, interval=interval, retry_on=(Exception,))


def peer_of(group: LabGroup, host: str, overlay: int = 0) -> dict | None:
    """The only peer of ``host`` (a two-node group), from its agent's status."""
    peers = group.status(host)["overlays"][overlay]["peers"]
    return peers[0] if len(peers) == 1 else None


def wait_peer(group: LabGroup, host: str, pred: Callable[[dict], bool], timeout: float, what: str) -> dict:
    def check():
        p = peer_of(group, host)
        return p if p is not None and pred(p) else None
    return until(check, timeout, f"{host}: {what}")


def wait_up(group: LabGroup, timeout: float, path: str | None = None) -> dict[str, dict]:
    """Every node's peer up (and on ``path`` if given); returns each node's peer entry."""
    want = (lambda p: p["state"] == "up" and (path is None or p["path"] == path))
    return {h: wait_peer(group, h, want, timeout, f"link up{' on a ' + path + ' path' if path else ''}")
            for h in group.nodes}


def log_tails(group: LabGroup, lines: int = 30) -> str:
    """The last lines of every node's agent and worker logs: what a failed wait shows."""
    out = []
    for h, node in group.nodes.items():
        for f in [node.dir / "agent.log", *sorted((node.dir / "state").glob("worker*.log"))]:
            if f.exists():
                tail = f.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {h}: {f.name}\n" + "\n".join(tail))
    return "\n".join(out)


@contextlib.contextmanager
def logs_on_failure(group: LabGroup):
    """A failed assertion inside also shows the nodes' log tails (the lab is gone afterwards)."""
    try:
        yield
    except AssertionError as e:
        raise AssertionError(f"{e}\n{log_tails(group)}") from None


def ping_ok(lab: Lab, host: str, addr: str, count: int = 2) -> bool:
    return lab.exec(host, ["ping", "-c", str(count), "-i", "0.2", "-W", "2", addr], check=False, timeout=30).returncode == 0


def links(lab: Lab, host: str) -> list[str]:
    """Interface names in the host's namespace (``ip -o link``)."""
    out = lab.exec(host, ["ip", "-o", "link"]).stdout
    return [line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines() if line.strip()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def children(pid: int) -> list[int]:
    """Live direct children of ``pid`` (from /proc/*/stat)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and proc.alive(int(d.name)):
            out.append(int(d.name))
    return out


@dataclass
class AgentProcs:
    """What one node's agent runs: itself, its private OVS, the switch app, the pool processes."""
    agent: int
    ovsdb: int | None
    vswitchd: int | None
    switch_apps: list[int] = field(default_factory=list)
    workers: list[int] = field(default_factory=list)

    def all(self) -> dict[str, int]:
        out = {"agent": self.agent, "ovsdb-server": self.ovsdb, "ovs-vswitchd": self.vswitchd}
        out |= {f"switch app {i}": p for i, p in enumerate(self.switch_apps)}
        out |= {f"tunnel worker {i}": p for i, p in enumerate(self.workers)}
        return {k: v for k, v in out.items() if v is not None}

    def alive(self) -> dict[str, int]:
        return {k: v for k, v in self.all().items() if proc.alive(v)}


def ovs_rundir(group: LabGroup, host: str) -> Path:
    return group.nodes[host].dir / "state" / "ovs"


def agent_procs(group: LabGroup, host: str) -> AgentProcs:
    """The node's processes: the agent from its pid file, OVS from the pid files in the node's
    OVS run directory (checked against their command line), the app and the workers as the
    agent's children."""
    node = group.nodes[host]
    agent = proc.read_pidfile(node.dir / "agent.pid")
    cmd = _cmdline(agent) if agent else b""     # 'ipop-switch up' execs 'python -m ipop_switch.agent'
    assert b"ipop_switch.agent" in cmd or b"ipop_switch.cli" in cmd, f"{host}: no agent pid file or not an agent"
    rundir = ovs_rundir(group, host)
    ovs = {}
    for name in ("ovsdb-server", "ovs-vswitchd"):
        pid = proc.read_pidfile(rundir / f"{name}.pid")
        ovs[name] = pid if pid and str(rundir).encode() in _cmdline(pid) else None
    kids = children(agent)
    return AgentProcs(agent, ovs["ovsdb-server"], ovs["ovs-vswitchd"],
                      [p for p in kids if b"ryu_apps.launch" in _cmdline(p)],
                      [p for p in kids if b"ipop_switch.tunnel.poolproc" in _cmdline(p)])


def cli(lab: Lab, host: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """``ipop-switch ARGS`` in the host's namespace, as a user there would run it."""
    return lab.exec(host, CLI + list(args), check=False, timeout=timeout)


def status_json(lab: Lab, group: LabGroup, host: str) -> dict:
    r = cli(lab, host, "status", "-c", str(group.nodes[host].config), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def nft(lab: Lab, host: str, ruleset: str) -> None:
    proc.run(["nft", "-f", "-"], netns=lab.netns_of(host), input=ruleset)


def nft_drop_udp(table: str, peer_ip: str | None = None) -> str:
    """A table that drops UDP in and out of a host (to and from ``peer_ip`` only, if given)."""
    return host_udp_drop_ruleset(table, peer_ip)
