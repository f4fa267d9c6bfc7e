"""Talks to a running agent through its status socket, as ``ipop-switch status`` does.

Everything that looks at a node from outside (the CLI, the lab, the demo, benchmarks)
uses this module and nothing of ``agent/``: the socket's one-line request and one
JSON answer are the whole interface.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from .errors import IpopError

REQUEST = b"status\n"


def answers(path: Path) -> bool:
    """True if an agent answers on ``path`` (a stale socket file does not)."""
    try:
        query(path, timeout=1.0)
        return True
    except IpopError:
        return False


def query(path: Path, *, timeout: float = 5.0) -> dict:
    """Ask a running agent for its status (blocking; used by the CLI)."""
    return _ask(path, REQUEST, timeout)


def command(path: Path, cmd: dict, *, timeout: float = 70.0) -> dict:
    """Send a command (``{"cmd": "attach", ...}``) to a running agent; its answer, or
    IpopError with the agent's one-line error."""
    answer = _ask(path, json.dumps(cmd).encode() + b"\n", timeout)
    if not answer.get("ok"):
        raise IpopError(answer.get("error") or "the agent refused the command")
    return answer


def _ask(path: Path, request: bytes, timeout: float) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.sendall(request)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except FileNotFoundError:
        raise IpopError(f"no agent running (no {path}); start one with 'ipop-switch up -c CONFIG'") from None
    except (ConnectionRefusedError, socket.timeout, OSError) as e:
        raise IpopError(f"agent at {path} does not answer: {e}") from None
    finally:
        s.close()
    try:
        return json.loads(buf)
    except ValueError:
        raise IpopError(f"agent at {path} sent a malformed status") from None
