"""Running external commands and daemons, optionally inside a network namespace.

Daemons are started without ``--detach`` so that they stay our children where we
live long enough (tests), or are orphaned into PID 1 (CLI ``lab up``). PID 1 on
these machines does not reap, so liveness is judged from /proc state, never from
``kill -0`` alone (a zombie still answers it).

A daemon that must not outlive its starter (an agent's OVS and switch app, a test
run's labs) is spawned with ``die_with_parent``: the kernel sends it SIGTERM when
the thread that started it ends, however it ends (``kill -9`` included).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Mapping, Sequence

from .errors import CommandError, IpopError


def netns_prefix(netns: str | None) -> list[str]:
    """argv prefix that runs a command inside ``netns`` (nothing for the root namespace)."""
    return ["ip", "netns", "exec", netns] if netns else []


def run(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    check: bool = True,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; raise CommandError with its stderr if it fails."""
    full = netns_prefix(netns) + list(argv)
    try:
        cp = subprocess.run(
            full,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else {**os.environ, **env},
            input=input,
        )
    except FileNotFoundError as e:
        raise IpopError(f"{full[0]}: command not found (run ./bootstrap.sh install)") from e
    except subprocess.TimeoutExpired as e:
        raise IpopError(f"{' '.join(full[:6])}: timed out after {timeout:.0f}s") from e
    if check and cp.returncode != 0:
        raise CommandError(full, cp.returncode, cp.stderr or cp.stdout)
    return cp


def require(binary: str, package: str) -> str:
    """Path of ``binary``, or a one-line error naming the Debian package to install."""
    path = shutil.which(binary)
    if not path:
        raise IpopError(f"{binary} not found: install the Debian package {package} (./bootstrap.sh install)")
    return path


def spawn(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    new_session: bool = True,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-running process (a daemon kept in the foreground). With ``die_with_parent``
    it gets SIGTERM when the calling thread ends (spawn it from the main thread, then)."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            netns_prefix(netns) + list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else {**os.environ, **env},
            start_new_session=new_session,
            preexec_fn=_die_with(os.getpid()) if die_with_parent else None,
        )
    finally:
        if log:
            out.close()  # type: ignore[union-attr]


PR_SET_PDEATHSIG = 1


def _die_with(parent: int):
    """A preexec function: SIGTERM to the child when its parent ends. ``ip netns exec`` keeps it
    (it only execs), so it reaches the daemon itself; the check after prctl closes the race
    with a parent that died before the child asked."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)
    return preexec


def alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    # state is the field after the parenthesised command name
    return stat[stat.rindex(")") + 2] not in "ZX"


def read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def terminate(pid: int, *, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reap if it is our child."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        if not alive(pid):
            break
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not alive(pid):
                break
            time.sleep(0.02)
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_for(predicate, *, timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    """Poll ``predicate`` until true; raise IpopError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise IpopError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def require_root() -> None:
    if os.geteuid() != 0:
        raise IpopError("must run as root (network namespaces, OVS and TAP devices need it)")
