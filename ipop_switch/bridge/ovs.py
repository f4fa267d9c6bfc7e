"""A private Open vSwitch instance (ovsdb-server + ovs-vswitchd) with its own files.

Each instance lives in its own run directory (database, sockets, pid and log
files), optionally with ovs-vswitchd inside a network namespace, so that several
run side by side on one machine (one per lab host). Facts that cost us hours:
OVS_RUNDIR/OVS_DBDIR/OVS_LOGDIR must be exported
to ovs-vswitchd itself; the db socket path must be absolute; ovs-vswitchd must
run in the namespace whose interfaces it uses; creating a bridge can fail while
``ovs-vsctl`` exits 0, so the ``error`` and ``ofport`` columns are checked; with
the userspace datapath TSO must be enabled before ovs-vswitchd starts, or TCP
through the bridge hangs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CommandError, IpopError
from .. import proc

EMC_INSERT_INV_PROB = 1     # 1 = every missed flow enters the exact-match cache (OVS default: 100)
SCHEMA_PATHS = ("/usr/share/openvswitch/vswitch.ovsschema", "/usr/local/share/openvswitch/vswitch.ovsschema")


class OvsError(IpopError):
    """Open vSwitch is missing, broken or refused a change."""


def kernel_datapath_available() -> bool:
    """The kernel datapath needs the openvswitch module; without it we use ``netdev``."""
    return Path("/sys/module/openvswitch").exists()


def default_datapath() -> str:
    return "system" if kernel_datapath_available() else "netdev"


@dataclass
class OvsInstance:
    """One private OVS. ``start()`` then use, ``stop()`` removes every process and file.

    ``OvsInstance.attach(db_socket)`` is the other kind: an OVS that already runs (the
    system's), used through its database socket; we never start, stop or delete anything of
    it but the bridges and ports we make."""

    rundir: Path
    netns: str | None = None
    datapath: str = field(default_factory=default_datapath)
    die_with_parent: bool = False      # the agent's OVS ends with the agent, even on kill -9
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    external: bool = False             # not ours (attach()): stop() leaves it alone
    db_socket: Path | None = None      # its database socket, when not <rundir>/db.sock

    def __post_init__(self) -> None:
        self.rundir = Path(self.rundir).absolute()

    @classmethod
    def attach(cls, db_socket: Path | str, *, netns: str | None = None, datapath: str = "auto",
               timeout: float = 5.0) -> "OvsInstance":
        """A running Open vSwitch (ovs.mode = system): checks that its database answers and picks
        the datapath its bridges use (an ovs-vswitchd that does not follow shows at the first
        change, which waits for it: a timeout). The run directory is the socket's (where OVS
        keeps its pid files and control sockets)."""
        proc.require("ovs-vsctl", "openvswitch-switch")
        sock = Path(db_socket).absolute()
        if not sock.exists():
            raise OvsError(f"no Open vSwitch database socket at {sock}: is Open vSwitch running? "
                           "(ovs.db_socket names another socket)")
        if not sock.is_socket():
            raise OvsError(f"{sock} is not a socket (ovs.db_socket must name ovsdb-server's unix socket)")
        inst = cls(sock.parent, netns=netns, datapath="netdev", external=True, db_socket=sock)
        try:
            inst.vsctl("get", "Open_vSwitch", ".", "ovs_version", timeout=timeout)
        except IpopError as e:
            raise OvsError(f"Open vSwitch at unix:{sock} does not answer within {timeout:.0f}s "
                           f"({str(e).split(': ', 1)[-1]})") from None
        inst.datapath = inst._running_datapath() if datapath == "auto" else datapath
        return inst

    def _running_datapath(self) -> str:
        """What the OVS's bridges use (``system`` for an empty datapath_type), else the default."""
        out = self.vsctl("--format=json", "--columns=datapath_type", "list", "Bridge")
        kinds = [row[0] or "system" for row in json.loads(out).get("data", []) if isinstance(row[0], str)]
        if kinds:
            return max(set(kinds), key=kinds.count)
        return default_datapath()

    # -- paths -----------------------------------------------------------
    @property
    def db_sock(self) -> Path:
        return self.db_socket or self.rundir / "db.sock"

    @property
    def db_path(self) -> Path:
        return self.rundir / "conf.db"

    def _env(self) -> dict[str, str]:
        d = str(self.rundir)
        if self.external:   # the system's: its own config and database directories stay its own
            return {"OVS_RUNDIR": d}
        return {"OVS_RUNDIR": d, "OVS_DBDIR": d, "OVS_LOGDIR": d, "OVS_SYSCONFDIR": d}

    # -- lifecycle ---------------------------------------------------------
    def start(self, *, timeout: float = 10.0) -> "OvsInstance":
        if self.external:
            raise OvsError("an attached (system) Open vSwitch is not ours to start")
        for b in ("ovsdb-server", "ovs-vswitchd", "ovsdb-tool", "ovs-vsctl"):
            proc.require(b, "openvswitch-switch")
        schema = next((p for p in SCHEMA_PATHS if os.path.exists(p)), None)
        if schema is None:
            raise OvsError("Open vSwitch schema vswitch.ovsschema not found: reinstall openvswitch-switch")
        if self.running():
            raise OvsError(f"an OVS instance already runs in {self.rundir}")
        self.rundir.mkdir(parents=True, exist_ok=True)
        for stale in self.rundir.iterdir():
            if stale.is_file() or stale.is_socket():
                stale.unlink()
        env = self._env()
        proc.run(["ovsdb-tool", "create", str(self.db_path), schema], env=env)
        self.procs["ovsdb-server"] = proc.spawn(
            [
                "ovsdb-server", str(self.db_path),
                f"--remote=punix:{self.db_sock}",
                f"--pidfile={self.rundir / 'ovsdb-server.pid'}",
                f"--unixctl={self.rundir / 'ovsdb-server.ctl'}",
                f"--log-file={self.rundir / 'ovsdb-server.log'}",
            ],
            env=env,
            log=self.rundir / "ovsdb-server.out",
            die_with_parent=self.die_with_parent,
        )
        try:
            proc.wait_for(self.db_sock.exists, timeout=timeout, what="ovsdb-server socket")
            self._init_db(timeout)
            if self.datapath == "netdev":
                # TSO must be set before ovs-vswitchd starts (read once at start-up). Every
                # flow into the exact-match cache (the default inserts 1 in 100, against
                # thrashing by many flows; a node's bridge carries few): ~0.1 ms less ping RTT
                # through the overlay's four crossings, idle CPU unchanged (benchmarks.md)
                self.vsctl("--no-wait", "set", "Open_vSwitch", ".", "other_config:userspace-tso-enable=true",
                           f"other_config:emc-insert-inv-prob={EMC_INSERT_INV_PROB}")
            self.procs["ovs-vswitchd"] = proc.spawn(
                [
                    "ovs-vswitchd", f"unix:{self.db_sock}",
                    f"--pidfile={self.rundir / 'ovs-vswitchd.pid'}",
                    f"--unixctl={self.rundir / 'ovs-vswitchd.ctl'}",
                    f"--log-file={self.rundir / 'ovs-vswitchd.log'}",
                ],
                netns=self.netns,
                env=env,
                log=self.rundir / "ovs-vswitchd.out",
                die_with_parent=self.die_with_parent,
            )
            proc.wait_for(
                lambda: (self.rundir / "ovs-vswitchd.ctl").exists() or self.procs["ovs-vswitchd"].poll() is not None,
                timeout=timeout,
                what="ovs-vswitchd control socket",
            )
            if self.procs["ovs-vswitchd"].poll() is not None:
                raise OvsError(f"ovs-vswitchd exited at start: {self._log_tail('ovs-vswitchd')}")
        except Exception:
            self.stop()
            raise
        return self

    def _init_db(self, timeout: float) -> None:
        """The socket file appears at bind(), before listen(): retry while the server is refusing."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.vsctl("--no-wait", "init", timeout=5)
                return
            except OvsError as e:
                if "Connection refused" not in str(e) or time.monotonic() > deadline \
                        or self.procs["ovsdb-server"].poll() is not None:
                    raise
                time.sleep(0.02)

    def running(self) -> bool:
        pids = [proc.read_pidfile(self.rundir / f"{n}.pid") for n in ("ovsdb-server", "ovs-vswitchd")]
        return any(p is not None and proc.alive(p) for p in pids)

    def stop(self) -> None:
        """Stop both daemons (also ones started by another process) and remove the run directory.
        An attached (system) OVS is left as it is."""
        if self.external:
            return
        for name in ("ovs-vswitchd", "ovsdb-server"):
            popen = self.procs.pop(name, None)
            pid = popen.pid if popen else proc.read_pidfile(self.rundir / f"{name}.pid")
            if pid is not None:
                proc.terminate(pid)
            if popen:
                try:
                    popen.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
        shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> "OvsInstance":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- commands ----------------------------------------------------------
    def vsctl(self, *args: str, timeout: float = 10.0) -> str:
        try:
            cp = proc.run(
                ["ovs-vsctl", f"--db=unix:{self.db_sock}", f"--timeout={int(timeout)}", *args],
                env=self._env(),
                timeout=timeout + 5,
            )
        except CommandError as e:
            raise OvsError(f"ovs-vsctl {' '.join(args[:3])}: {e.stderr.splitlines()[-1] if e.stderr else e}") from e
        return cp.stdout

    def ofctl(self, *args: str, bridge: str | None = None) -> str:
        """ovs-ofctl against a bridge of this instance (its mgmt socket is in our run directory)."""
        argv = ["ovs-ofctl", "-O", "OpenFlow13", *args]
        return proc.run(argv, env=self._env(), netns=self.netns).stdout

    def appctl(self, *args: str) -> str:
        ctl = self.rundir / "ovs-vswitchd.ctl"   # ours; the system's is pid-named, found through OVS_RUNDIR
        return proc.run(
            ["ovs-appctl", "-t", str(ctl) if ctl.exists() else "ovs-vswitchd", *args], env=self._env()
        ).stdout

    # -- bridges and ports -------------------------------------------------
    def add_bridge(self, name: str, *, fail_mode: str = "secure") -> None:
        """Create a bridge; ``fail_mode=standalone`` makes it a learning switch without a controller."""
        self.vsctl(
            "--may-exist", "add-br", name,
            "--", "set", "bridge", name, f"datapath_type={self.datapath}", f"fail_mode={fail_mode}",
        )
        self._check_interface(name)

    def del_bridge(self, name: str) -> None:
        self.vsctl("--if-exists", "del-br", name)

    def bridges(self) -> list[str]:
        return self.vsctl("list-br").split()

    def add_port(self, bridge: str, port: str, *, ofport: int | None = None) -> int:
        """Add an existing interface as a port; return its OpenFlow port number."""
        extra = ["--", "set", "interface", port, f"ofport_request={ofport}"] if ofport else []
        self.vsctl("--may-exist", "add-port", bridge, port, *extra)
        return self._check_interface(port)

    def del_port(self, bridge: str, port: str) -> None:
        self.vsctl("--if-exists", "del-port", bridge, port)

    def ports(self, bridge: str) -> list[str]:
        return self.vsctl("list-ports", bridge).split()

    def _check_interface(self, name: str) -> int:
        """ovs-vsctl exits 0 even when the datapath refused the interface: look at the columns."""
        out = self.vsctl("--format=json", "--columns=ofport,error", "list", "Interface", name)
        row = json.loads(out)["data"][0]
        ofport, error = row[0], row[1]
        if isinstance(error, str) and error:
            raise OvsError(f"interface {name}: {error}")
        if not isinstance(ofport, int) or ofport < 0:
            raise OvsError(f"interface {name} got no OpenFlow port (ofport={ofport}); see {self.rundir}/ovs-vswitchd.log")
        return ofport

    def _log_tail(self, name: str) -> str:
        for f in (self.rundir / f"{name}.log", self.rundir / f"{name}.out"):
            try:
                lines = [l for l in f.read_text().splitlines() if "ERR" in l or "EMER" in l]
                if lines:
                    return lines[-1]
            except FileNotFoundError:
                continue
        return "no log"


def main(argv: list[str] | None = None) -> int:
    """``python -m ipop_switch.bridge.ovs start|stop|status RUNDIR [--netns NS]`` (used by ovs_scripts/)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="ovs-private", description="a private Open vSwitch instance")
    ap.add_argument("action", choices=("start", "stop", "status"))
    ap.add_argument("rundir", type=Path)
    ap.add_argument("--netns", help="run ovs-vswitchd inside this network namespace")
    ap.add_argument("--datapath", choices=("system", "netdev"), default=None)
    a = ap.parse_args(argv)
    inst = OvsInstance(a.rundir, netns=a.netns, **({"datapath": a.datapath} if a.datapath else {}))
    try:
        if a.action == "start":
            inst.start()
            inst.procs.clear()  # leave the daemons running after we exit
            print(f"OVS running in {inst.rundir} (datapath {inst.datapath}); db unix:{inst.db_sock}")
        elif a.action == "stop":
            inst.stop()
        else:
            print("running" if inst.running() else "stopped")
            return 0 if inst.running() else 3
    except IpopError as e:
        print(f"ovs-private: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


WANT_RMEM = 4 * 1024 * 1024


def host_buffer_note(datapath: str) -> str | None:
    """With the userspace datapath, ovs-vswitchd reads each port through an AF_PACKET socket
    sized by net.core.rmem_default: too small (Debian's default 212992) and it drops
    super-frames of a TSO stream (docs/benchmarks.md).
    Raise it when we may (root namespace); otherwise say what to do."""
    if datapath != "netdev":
        return None
    path = Path("/proc/sys/net/core/rmem_default")
    try:
        cur = int(path.read_text())
    except (OSError, ValueError):
        return None
    if cur >= WANT_RMEM:
        return None
    try:
        path.write_text(str(WANT_RMEM))
        return f"raised net.core.rmem_default {cur} -> {WANT_RMEM} for OVS's packet sockets"
    except OSError:
        return (f"net.core.rmem_default is {cur}: OVS (userspace datapath) may drop bursts; "
                f"run 'sysctl -w net.core.rmem_default={WANT_RMEM}' in the root namespace before starting")
