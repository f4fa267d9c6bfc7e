"""The overlay view's HTTP server, on the agent's asyncio loop (aiohttp).

One read-only page (``static/``: HTML, CSS, hand-written SVG drawing in plain JS; nothing is
fetched from elsewhere) and two data routes: ``/api/graph`` (the graph now, JSON) and
``/api/events`` (server-sent events: the graph again whenever it changed, at most once a
``TICK``). The server knows nothing of the agent: it is given a ``ViewSource``.

Why aiohttp: the page needs a long-lived stream (SSE) served from the agent's own loop, beside
its links; the stdlib's http.server is threaded and blocking (the Prometheus exporter's
pattern: fine for one scrape, not for streams), and a hand-made HTTP parser is a place for
bugs on untrusted input. aiohttp is the well-kept asyncio HTTP server, pure asyncio, no build.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
from importlib import resources
from typing import Protocol

from aiohttp import web

from ..errors import IpopError

log = logging.getLogger("ipop_switch.web")

TICK = 1.0                  # s between two looks at the graph for the event streams
HEARTBEAT = 15.0            # s: a comment line keeps idle streams (and proxies) open
MAX_STREAMS = 16            # open event streams at once (more get 503)
ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; " \
      "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


class ViewSource(Protocol):
    def overlays(self) -> list[str]: ...
    def graph(self, overlay: str) -> dict: ...        # web/model.py's graph
    def watch(self, overlay: str) -> None: ...        # a page is open: keep the summaries coming


def _host_ok(host: str | None) -> bool:
    """Only requests addressed to an IP literal or localhost: a web page elsewhere cannot
    rebind one of its own names to this address and read the overlay through the browser."""
    if not host:
        return False
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def bind(addr: tuple[str, int]) -> socket.socket:
    """The listening socket, bound here so a bad or busy address is one clear error."""
    host, port = addr
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise IpopError(f"node.web: cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class WebServer:
    def __init__(self, addr: tuple[str, int], source: ViewSource) -> None:
        self.addr = addr
        self.source = source
        self.streams = 0
        self.requests = 0
        self.refused = 0
        self._runner: web.AppRunner | None = None
        self._sock: socket.socket | None = None
        self._assets = {name: resources.files(__package__).joinpath("static", name).read_bytes() for name in ASSETS}

    @property
    def url(self) -> str:
        host, port = self.addr
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def bind(self) -> "WebServer":
        """Take the address now (IpopError if it cannot be had); ``start`` serves it later."""
        if self._sock is None:
            self._sock = bind(self.addr)
        return self

    async def start(self) -> None:
        sock, self._sock = self.bind()._sock, None
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._index)
        app.router.add_get("/assets/{name}", self._asset)
        app.router.add_get("/api/overlays", self._overlays)
        app.router.add_get("/api/graph", self._graph)
        app.router.add_get("/api/events", self._events)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.info("event=web_up url=%s", self.url)

    async def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def status(self) -> dict:
        return {"url": self.url, "streams": self.streams, "requests": self.requests, "refused": self.refused}

    # -- handlers ------------------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler):
        self.requests += 1
        if not _host_ok(request.host):
            self.refused += 1
            return web.Response(status=421, text="use the address itself (or localhost) in the URL\n")
        resp = await handler(request)
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    def _asset_response(self, name: str) -> web.Response:
        return web.Response(body=self._assets[name], content_type=ASSETS[name], charset="utf-8")

    async def _index(self, request: web.Request) -> web.Response:
        return self._asset_response("index.html")

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS or name == "index.html":
            raise web.HTTPNotFound()
        return self._asset_response(name)

    def _overlay(self, request: web.Request) -> str:
        names = self.source.overlays()
        name = request.query.get("overlay") or (names[0] if names else "")
        if name not in names:
            raise web.HTTPNotFound(text=f"no overlay {name[:40]!r} here ({', '.join(names)})\n")
        return name

    async def _overlays(self, request: web.Request) -> web.Response:
        return web.json_response({"overlays": self.source.overlays()})

    async def _graph(self, request: web.Request) -> web.Response:
        name = self._overlay(request)
        self.source.watch(name)
        return web.json_response(self.source.graph(name))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        name = self._overlay(request)
        if self.streams >= MAX_STREAMS:
            raise web.HTTPServiceUnavailable(text="too many open pages\n")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "Content-Security-Policy": CSP, "X-Accel-Buffering": "no"})
        self.streams += 1
        try:
            await resp.prepare(request)
            last, quiet = None, 0.0
            while True:
                self.source.watch(name)
                text = json.dumps(self.source.graph(name), separators=(",", ":"))
                if text != last:
                    await resp.write(f"event: graph\ndata: {text}\n\n".encode())
                    last, quiet = text, 0.0
                elif quiet >= HEARTBEAT:
                    await resp.write(b": idle\n\n")
                    quiet = 0.0
                await asyncio.sleep(TICK)
                quiet += TICK
        except ConnectionError:       # the page went away
            pass
        finally:
            self.streams -= 1
        return resp
