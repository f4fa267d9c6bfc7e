"""The lab's ejabberd cluster: N Erlang nodes in the core namespace, one XMPP address each.

Why ejabberd beside Prosody: it clusters (Erlang distribution, Mnesia replicated between
nodes), so the lab can kill one signaling server and watch agents move to another. Prosody
stays the default single server.

Each node runs ``erl ... -s ejabberd`` in the foreground (as Prosody and coturn do), as root,
with a private config, Mnesia spool, log and cookie under the lab's directory; its node name
is ``ejabberdN@<its XMPP address>`` (long names on addresses: the namespace has no resolver).
One ``epmd`` of our own runs in the namespace in the foreground, started before the nodes
(``-start_epmd false``), so nothing daemonizes out of our sight: the lab's teardown kills
whatever runs in its namespaces, and tied labs end with their owner. The Debian package's
``ejabberdctl`` is not used: as root it switches to the ``ejabberd`` user and the system
paths; a hidden Erlang node of ours runs the ``ejabberd_ctl`` commands instead (one VM per
command is ~0.5 s, so accounts are registered by one RPC script, not one command each).
"""

from __future__ import annotations

import re
import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .. import proc
from ..errors import IpopError
from ..progress import stage
from ..servers import MUC_DOMAIN, XMPP_DOMAIN, XMPP_PORT

ERL_LIBS = "/usr/lib/x86_64-linux-gnu"      # where Debian puts ejabberd's own applications
START_TIMEOUT = 40.0                        # two nodes start at once in ~3 s here; slow machines vary
EPMD_PORT = 4369
XMPP_MORE = ("198.18.0.4", "198.18.0.5", "198.18.0.6")   # the core's addresses of nodes 2..4


def xmpp_addrs(nodes: int) -> tuple[str, ...]:
    """The XMPP address of each of ``nodes`` servers (the first is the single server's, Prosody's)."""
    from .services import XMPP_ADDR
    return (XMPP_ADDR, *XMPP_MORE[:nodes - 1])


def ejabberd_config(root: Path, ca_dir: Path, addr: str) -> str:
    """One node's ejabberd.yml: c2s with STARTTLS required on ``addr`` only, accounts in Mnesia
    (replicated in the cluster), a MUC service whose rooms are public and list their occupants
    (the agents' split-room check reads them), no registration, no s2s, no HTTP."""
    return f'''# written by ipop-switch (lab)
hosts: ["{XMPP_DOMAIN}"]
loglevel: info
log_rotate_count: 0
certfiles:
  - "{ca_dir / 'server.crt'}"
  - "{ca_dir / 'server.key'}"
listen:
  -
    port: {XMPP_PORT}
    ip: "{addr}"
    module: ejabberd_c2s
    starttls_required: true
    protocol_options: ["no_sslv3", "no_tlsv1", "no_tlsv1_1"]
    max_stanza_size: 262144
    shaper: none
    access: all
auth_method: internal
auth_password_format: scram
s2s_access: none
modules:
  mod_disco: {{}}
  mod_ping: {{}}
  mod_roster: {{}}
  mod_muc:
    host: "{MUC_DOMAIN}"
    access: all
    access_create: all
    access_persistent: all
    access_admin: none
    history_size: 0
    default_room_options:
      persistent: false
      public: true
      public_list: true
      mam: false
      allow_private_messages: true
  mod_muc_admin: {{}}
'''


def node_name(i: int, addr: str) -> str:
    return f"ejabberd{i}@{addr}"


@dataclass
class EjabberdCluster:
    """``addrs[i]`` is node i+1's XMPP address (all in ``netns``); the first is the seed the
    others join."""

    root: Path
    netns: str
    ca_dir: Path
    addrs: tuple[str, ...]

    @property
    def cookie_file(self) -> Path:
        return self.root / "cookie"

    def cookie(self) -> str:
        if not self.cookie_file.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            self.cookie_file.write_text(secrets.token_hex(16))
            self.cookie_file.chmod(0o600)
        return self.cookie_file.read_text().strip()

    def node_dir(self, i: int) -> Path:
        return self.root / f"node{i}"

    def write_configs(self) -> None:
        for i, addr in enumerate(self.addrs, start=1):
            d = self.node_dir(i)
            (d / "spool").mkdir(parents=True, exist_ok=True)
            (d / "ejabberd.yml").write_text(ejabberd_config(d, self.ca_dir, addr))

    def _env(self, i: int | None = None) -> dict[str, str]:
        env = {"ERL_LIBS": ERL_LIBS, "ERL_CRASH_DUMP_BYTES": "0", "HOME": str(self.root)}
        if i is not None:
            d = self.node_dir(i)
            env |= {"EJABBERD_CONFIG_PATH": str(d / "ejabberd.yml"), "EJABBERD_LOG_PATH": str(d / "ejabberd.log")}
        return env

    # -- processes ----------------------------------------------------------------------
    def start_epmd(self, *, tied: bool = False) -> int:
        """The namespace's port mapper, in the foreground (the nodes are told not to start one)."""
        epmd = proc.require("epmd", "erlang-base")
        p = proc.spawn([epmd, "-port", str(EPMD_PORT)], netns=self.netns, log=self.root / "epmd.log",
                       die_with_parent=tied)
        proc.wait_for(lambda: _listening(self.netns, EPMD_PORT) or p.poll() is not None, timeout=10,
                      what="epmd to listen")
        if p.poll() is not None:
            raise IpopError(f"epmd exited at start; see {self.root / 'epmd.log'}")
        return p.pid

    def spawn_node(self, i: int, *, tied: bool = False) -> subprocess.Popen[bytes]:
        """Start node i (1-based) without waiting for it."""
        proc.require("erl", "erlang-base")
        d = self.node_dir(i)
        argv = ["erl", "-name", node_name(i, self.addrs[i - 1]), "-setcookie", self.cookie(), "-noinput",
                "-start_epmd", "false", "+K", "true", "+P", "250000",
                "-mnesia", "dir", f'"{d / "spool"}"', "-s", "ejabberd"]
        return proc.spawn(argv, netns=self.netns, log=d / "erl.out", env=self._env(i), die_with_parent=tied)

    def wait_started(self, i: int, p: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> None:
        """Until node i accepts XMPP connections (its c2s listener is the last thing it opens)."""
        addr = self.addrs[i - 1]
        proc.wait_for(lambda: _listening(self.netns, XMPP_PORT, addr) or p.poll() is not None,
                      timeout=timeout, interval=0.2, what=f"ejabberd node {i} to listen")
        if p.poll() is not None:
            raise IpopError(f"ejabberd node {i} exited at start; see {self.node_dir(i) / 'erl.out'} "
                            f"and {self.node_dir(i) / 'ejabberd.log'}")

    def ctl(self, i: int, *args: str, timeout: float = 60.0) -> str:
        """One ``ejabberd_ctl`` command on node i (as ``ejabberdctl`` runs it); its output."""
        argv = ["erl", "-name", f"ctl{secrets.token_hex(3)}@{self.addrs[0]}", "-setcookie", self.cookie(),
                "-hidden", "-noinput", "-start_epmd", "false", "-s", "ejabberd_ctl",
                "-extra", node_name(i, self.addrs[i - 1]), *args]
        cp = proc.run(argv, netns=self.netns, env=self._env(), timeout=timeout, check=False)
        if cp.returncode != 0:
            raise IpopError(f"ejabberd node {i}: {' '.join(args[:2])} failed: {(cp.stdout + cp.stderr).strip()[:300]}")
        return cp.stdout

    def rpc_script(self, i: int, calls: list[str], timeout: float = 60.0) -> str:
        """Run Erlang expressions ``rpc:call(Node, ...)`` on node i from one hidden VM."""
        node = node_name(i, self.addrs[i - 1])
        body = ", ".join(f"io:format(\"~p~n\", [rpc:call('{node}', {c})])" for c in calls)
        argv = ["erl", "-name", f"ctl{secrets.token_hex(3)}@{self.addrs[0]}", "-setcookie", self.cookie(),
                "-hidden", "-noinput", "-noshell", "-start_epmd", "false",
                "-eval", f"{body}, init:stop()."]
        return proc.run(argv, netns=self.netns, env=self._env(), timeout=timeout).stdout

    def register(self, accounts: list[tuple[str, str]]) -> None:
        """Accounts once, on the first node: Mnesia replicates them to the others."""
        if not accounts:
            return
        calls = [f"ejabberd_auth, try_register, [<<\"{u}\">>, <<\"{XMPP_DOMAIN}\">>, <<\"{pw}\">>]"
                 for u, pw in accounts]
        out = self.rpc_script(1, calls).split()
        bad = [f"{u}: {r}" for (u, _), r in zip(accounts, out) if r != "ok"]
        if bad or len(out) != len(accounts):
            raise IpopError(f"ejabberd: registering accounts failed: {'; '.join(bad) or out}")

    def create_room(self, room: str) -> None:
        """The overlay's room made in advance (persistent), so agents that join at once through
        different nodes cannot each create one of their own."""
        self.ctl(1, "create_room_with_opts", room, MUC_DOMAIN, XMPP_DOMAIN,
                 '[{"name": "persistent", "value": "true"}]')      # ejabberd_ctl reads list arguments as JSON

    def start(self, accounts: list[tuple[str, str]], rooms: list[str], *, tied: bool = False) -> dict[str, int]:
        """epmd, every node at once, the others joined to the first, accounts and rooms made.
        Returns the pids by service name (``epmd``, ``ejabberd1``, ...)."""
        self.write_configs()
        pids = {"epmd": self.start_epmd(tied=tied)}
        t0 = time.monotonic()
        procs = {i: self.spawn_node(i, tied=tied) for i in range(1, len(self.addrs) + 1)}
        pids |= {f"ejabberd{i}": p.pid for i, p in procs.items()}
        for i, p in procs.items():
            self.wait_started(i, p)
        stage(f"ejabberd: {len(procs)} node(s) up in {time.monotonic() - t0:.1f}s; clustering")
        for i in range(2, len(self.addrs) + 1):
            self.ctl(i, "join_cluster", node_name(1, self.addrs[0]))
        if len(self.addrs) > 1:
            self.wait_clustered()
        self.register(accounts)
        for r in rooms:
            self.create_room(r)
        return pids

    def wait_clustered(self, timeout: float = 30.0) -> None:
        want = len(self.addrs)
        def joined() -> bool:
            out = self.ctl(1, "list_cluster", timeout=20)
            return len(set(re.findall(r"ejabberd\d+@[\d.]+", out))) >= want     # one node name a line, quoted
        proc.wait_for(joined, timeout=timeout, interval=0.5, what=f"{want} ejabberd nodes in one cluster")
        for i in range(2, want + 1):      # join_cluster restarts the joiner's ejabberd: wait for its c2s
            proc.wait_for(lambda i=i: _listening(self.netns, XMPP_PORT, self.addrs[i - 1]), timeout=START_TIMEOUT,
                          interval=0.2, what=f"ejabberd node {i} to listen after joining")

    def restart_node(self, i: int, *, tied: bool = False) -> int:
        """Start node i again after it was killed (it rejoins the cluster from its spool)."""
        p = self.spawn_node(i, tied=tied)
        self.wait_started(i, p)
        return p.pid


def _listening(netns: str, port: int, addr: str | None = None) -> bool:
    src = f"{addr}:{port}" if addr else f":{port}"
    out = proc.run(["ss", "-H", "-ltn", "src", src], netns=netns, check=False).stdout
    return bool(out.strip())
