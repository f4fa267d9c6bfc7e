"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol, for tests that
look at a page as a person would: load it, read its live DOM, take a screenshot.

A minimal client: one page, ``Page.navigate``, ``Runtime.evaluate`` and
``Page.captureScreenshot`` over the page's DevTools websocket (aiohttp's client, which the
package already depends on). Every call has a timeout; ``close`` ends the browser.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

CALL_TIMEOUT = 20.0
START_TIMEOUT = 30.0


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    def __init__(self, workdir: Path, *, width: int = 1400, height: int = 900) -> None:
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("chromium is not installed (bootstrap.sh installs Debian's chromium)")
        self.dir = Path(workdir)
        profile = self.dir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        (profile / "DevToolsActivePort").unlink(missing_ok=True)     # a reused profile's is stale
        self.log = open(self.dir / "chromium.log", "wb")
        # root needs --no-sandbox; nothing of the browser's own reaches the network (no updates, no sync)
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--window-size={width},{height}", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.loop = asyncio.new_event_loop()
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            port = self._port(profile / "DevToolsActivePort")
            self.loop.run_until_complete(self._connect(port))
        except BaseException:
            self.close()
            raise

    def _port(self, f: Path) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode} (see {self.dir / 'chromium.log'})")
            try:
                return int(f.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                time.sleep(0.1)
        raise RuntimeError(f"chromium did not open its DevTools port within {START_TIMEOUT:.0f}s")

    async def _connect(self, port: int) -> None:
        targets = []
        for _ in range(50):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                targets = [t for t in json.load(r) if t.get("type") == "page"]
            if targets:
                break
            await asyncio.sleep(0.1)
        if not targets:
            raise RuntimeError("chromium has no page to drive")
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0)

    async def _call(self, method: str, params: dict | None) -> dict:
        mid = next(self._ids)
        await self._ws.send_str(json.dumps({"id": mid, "method": method, "params": params or {}}))  # type: ignore[union-attr]
        while True:
            msg = await self._ws.receive()                                                           # type: ignore[union-attr]
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection closed ({msg.type})")
            d = json.loads(msg.data)
            if d.get("id") == mid:
                if "error" in d:
                    raise RuntimeError(f"{method}: {d['error']}")
                return d.get("result", {})

    def call(self, method: str, params: dict | None = None, timeout: float = CALL_TIMEOUT) -> dict:
        return self.loop.run_until_complete(asyncio.wait_for(self._call(method, params), timeout))

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able)."""
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> tuple[Any, float]:
        """(value, seconds) once ``expression`` is truthy in the page; AssertionError on timeout."""
        t0 = time.monotonic()
        value = None
        while time.monotonic() - t0 < timeout:
            try:
                value = self.eval(expression)
            except RuntimeError:
                value = None
            if value:
                return value, time.monotonic() - t0
            time.sleep(0.2)
        raise AssertionError(f"not within {timeout:.0f}s: {expression} (last: {value!r})")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            if self._ws is not None:
                self.loop.run_until_complete(asyncio.wait_for(self._ws.close(), 5))
            if self._session is not None:
                self.loop.run_until_complete(self._session.close())
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.loop.close()
        self.log.close()
