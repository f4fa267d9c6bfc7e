"""The agent's status: a JSON snapshot served on a local unix socket, read by
``ipop-switch status`` (table or ``--json``) through ``ipop_switch.status_client``,
and by the metrics exporter."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Awaitable, Callable

from ..errors import IpopError
from ..status_client import answers

class StatusServer:
    """Answers one JSON document per connection: the status (``snapshot`` builds it on
    demand), or, for a request line that is a JSON object, what ``control`` answers (attach,
    detach: the socket is root's, mode 0600)."""

    def __init__(self, path: Path, snapshot: Callable[[], Awaitable[dict]],
                 control: Callable[[dict], Awaitable[dict]] | None = None) -> None:
        self.path = Path(path)
        self.snapshot = snapshot
        self.control = control
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if answers(self.path):
                raise IpopError(f"another agent already serves {self.path}")
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 2.0)
            if line.lstrip().startswith(b"{"):
                answer = await self._command(line)
            else:
                answer = await asyncio.wait_for(self.snapshot(), 5.0)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _command(self, line: bytes) -> dict:
        try:
            cmd = json.loads(line)
            if not isinstance(cmd, dict) or not isinstance(cmd.get("cmd"), str):
                raise ValueError("not a command object")
        except ValueError as e:
            return {"ok": False, "error": f"malformed command: {e}"}
        if self.control is None:
            return {"ok": False, "error": "this agent takes no commands"}
        try:
            return await asyncio.wait_for(self.control(cmd), 60.0)
        except IpopError as e:
            return {"ok": False, "error": str(e)}
        except asyncio.TimeoutError:
            return {"ok": False, "error": f"{cmd['cmd']}: no answer within 60 s"}
        except Exception as e:          # a bug must not kill the socket
            return {"ok": False, "error": f"{cmd['cmd']} failed: {type(e).__name__}: {e}"}

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
