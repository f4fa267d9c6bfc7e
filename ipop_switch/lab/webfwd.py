"""The overlay view of a lab node, on this machine's loopback: a small TCP forwarder.

A lab node's page listens on 127.0.0.1 inside its host's network namespace, where no browser
of the machine can reach it. This process binds a port on the machine's own 127.0.0.1
first, then moves itself into the host's namespace (setns), so every connection it accepts
is carried to the page there. No socat, no route into the lab: only loopback on each side.

    python -m ipop_switch.lab.webfwd LISTEN_PORT NETNS TARGET_PORT [READY_FILE]

``forward`` starts it for the demo (a pid file in the lab's directory: ``lab down`` stops it).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import sys
import time
from pathlib import Path

from .. import proc

CLONE_NEWNET = 0x40000000
PORTS = range(9466, 9486)          # the machine-side ports tried, the view's own port first


def free_port(ports=PORTS) -> int | None:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    return None


def forward(lab, host: str, target_port: int) -> tuple[str, int] | None:
    """Start the forwarder for ``host``'s page; (URL on this machine, pid), or None when no
    port is free or it did not come up."""
    port = free_port()
    if port is None:
        return None
    d = lab.dir / "webfwd"
    d.mkdir(parents=True, exist_ok=True)
    ready = d / f"{host}.ready"
    ready.unlink(missing_ok=True)
    p = proc.spawn([sys.executable, "-m", "ipop_switch.lab.webfwd", str(port), lab.netns_of(host), str(target_port),
                    str(ready)], log=d / f"{host}.log", die_with_parent=lab.tied)
    (d / f"{host}.pid").write_text(f"{p.pid}\n")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and p.poll() is None:
        if ready.exists():
            return f"http://127.0.0.1:{port}/", p.pid
        time.sleep(0.05)
    return None


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()


async def _serve(sock: socket.socket, target_port: int) -> None:
    async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            tr, tw = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", target_port), 5)
        except (OSError, asyncio.TimeoutError):
            w.close()
            return
        await asyncio.gather(_pipe(r, tw), _pipe(tr, w))

    server = await asyncio.start_server(client, sock=sock)
    async with server:
        await server.serve_forever()


def main() -> None:
    port, netns, target = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))              # in the machine's namespace
    sock.listen(32)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:      # from now on new sockets are the lab host's
        sys.exit(f"webfwd: setns {netns}: {os.strerror(ctypes.get_errno())}")
    os.close(fd)
    print(f"webfwd: 127.0.0.1:{port} -> {netns} 127.0.0.1:{target}", flush=True)
    if len(sys.argv) > 4:
        Path(sys.argv[4]).touch()               # the one who started us: ready
    asyncio.run(_serve(sock, target))


if __name__ == "__main__":
    main()
