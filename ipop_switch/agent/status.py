"""The agent's status: a JSON snapshot served on a local unix socket, read by
``ipop-switch status`` (table or ``--json``) and by the metrics exporter."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Awaitable, Callable

from ..errors import IpopError

MAX_REQUEST = 256


class StatusServer:
    """Answers one JSON document per connection; ``snapshot`` builds it on demand."""

    def __init__(self, path: Path, snapshot: Callable[[], Awaitable[dict]]) -> None:
        self.path = Path(path)
        self.snapshot = snapshot
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if _answers(self.path):
                raise IpopError(f"another agent already serves {self.path}")
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readline(), 2.0)
            writer.write(json.dumps(await asyncio.wait_for(self.snapshot(), 5.0)).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _answers(path: Path) -> bool:
    try:
        query(path, timeout=1.0)
        return True
    except IpopError:
        return False


def query(path: Path, *, timeout: float = 5.0) -> dict:
    """Ask a running agent for its status (blocking; used by the CLI)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.sendall(b"status\n")
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
