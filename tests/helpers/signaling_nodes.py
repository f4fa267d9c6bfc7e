"""Test-side tools for signaling in the lab: a group with member identities, and harness
processes (``python -m ipop_switch.signaling.harness``) run in lab hosts' namespaces, read
through a thread so every wait is bounded."""

from __future__ import annotations

import datetime as dt
import json
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ipop_switch.identity import GroupCA, NodeIdentity
from ipop_switch.lab.services import XMPP_ADDR

HARNESS = [sys.executable, "-m", "ipop_switch.signaling.harness"]
FAST = ["--backoff-min", "0.2", "--backoff-max", "1.0", "--connect-timeout", "5", "--keepalive", "5",
        "--queue-timeout", "3", "--rejoin-grace", "8", "--leave-grace", "1", "--recheck", "1"]


def make_member(ca: GroupCA, dirpath: Path, name: str, **issue_kw) -> NodeIdentity:
    """A node identity with a certificate of ``ca`` (issue_kw: dates, for negative tests)."""
    ident = NodeIdentity.create(dirpath, name=name)
    cert = ca.issue(ident.request(), **issue_kw)
    if issue_kw:
        _install_unchecked(ident, ca, cert)
    else:
        ident.install(ca.bundle(cert))
    return ident


def _install_unchecked(ident: NodeIdentity, ca: GroupCA, cert) -> None:
    """Install a certificate the node itself would refuse (expired, ...): for negative tests."""
    from cryptography.hazmat.primitives import serialization
    pem = serialization.Encoding.PEM
    g = ident.group_dir(ca.name)
    g.mkdir(parents=True, exist_ok=True)
    (g / "node.crt").write_bytes(cert.public_bytes(pem))
    (g / "ca.crt").write_bytes(ca.cert.public_bytes(pem))
    (g / "crl.pem").write_bytes(ca.crl().public_bytes(pem))


def expired_window() -> dict:
    now = dt.datetime.now(dt.timezone.utc)
    return {"not_before": now - dt.timedelta(days=10), "not_after": now - dt.timedelta(days=1)}


@dataclass
class Node:
    """One harness process; ``lines`` collects every JSON line it printed."""

    name: str
    node_id: str
    proc: subprocess.Popen
    log: Path
    lines: list[dict] = field(default_factory=list)
    _q: "queue.Queue[dict | None]" = field(default_factory=queue.Queue)

    def start_reader(self) -> None:
        def read() -> None:
            for line in self.proc.stdout:
                try:
                    self._q.put(json.loads(line))
                except ValueError:
                    self._q.put({"event": "garbage", "line": line})
            self._q.put(None)
        threading.Thread(target=read, daemon=True).start()

    def drain(self) -> None:
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self.lines.append(item)

    def wait_for(self, pred, timeout: float, what: str = "event", since: int = 0) -> dict:
        """The first line from index ``since`` on for which pred(line) holds; AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            self.drain()
            for line in self.lines[seen:]:
                if pred(line):
                    return line
            seen = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no {what} within {timeout}s; log {self.log}; "
                                     f"last lines {self.lines[-5:]}")
            try:
                item = self._q.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if item is None:
                if self.proc.poll() is not None and not any(pred(l) for l in self.lines[seen:]):
                    raise AssertionError(f"{self.name}: exited ({self.proc.returncode}); log {self.log}; "
                                         f"last lines {self.lines[-5:]}")
                time.sleep(0.05)
            else:
                self.lines.append(item)

    def command(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def status(self, timeout: float = 5.0) -> dict:
        self.drain()
        mark = len(self.lines)
        self.command(cmd="status")
        return self.wait_for(lambda l: l["event"] == "status", timeout, "status", since=mark)

    def peers(self) -> set[str]:
        """Node ids currently known, from the event lines."""
        self.drain()
        known: set[str] = set()
        for l in self.lines:
            if l["event"] in ("appeared", "changed", "refreshed"):
                known.add(l["node_id"])
            elif l["event"] == "left":
                known.discard(l["node_id"])
        return known

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command(cmd="quit")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_node(lab, host: str, ident_dir: Path, overlay: str, logdir: Path, *, user: str | None = None,
               password: str | None = None, ca: Path | None = None, extra: list[str] | None = None,
               name: str | None = None) -> Node:
    h = lab.host(host)
    user = user or h.xmpp_user
    password = password if password is not None else h.xmpp_password
    name = name or f"{host}-{Path(ident_dir).name}"
    log = Path(logdir) / f"{name}.log"
    argv = HARNESS + ["--identity", str(ident_dir), "--overlay", overlay, "--jid", f"{user}@ipsw.test",
                      f"--password={password}", "--server", XMPP_ADDR, "--ca", str(ca or lab.ca_cert)] + FAST + \
        (extra or [])
    with open(log, "ab") as errf:
        p = lab.popen(host, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errf, text=True)
    nid = NodeIdentity.load(ident_dir).node_id
    node = Node(name, nid, p, log)
    node.start_reader()
    return node
