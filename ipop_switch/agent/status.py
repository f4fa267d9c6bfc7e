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
    """Answers one JSON document per connection; ``snapshot`` builds it on demand."""

    def __init__(self, path: Path, snapshot: Callable[[], Awaitable[dict]]) -> None:
        self.path = Path(path)
        self.snapshot = snapshot
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
