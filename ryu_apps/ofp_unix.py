"""os-ken's OpenFlow listener on a unix socket instead of a TCP port.

A TCP controller port on 127.0.0.1 is open to every local user: one could connect a fake
switch, or bind the port while the app restarts and be the controller OVS connects to
(security review, finding 3). A unix socket in the node's private run directory (0700),
itself 0600, is reachable by its owner (and root) only; each peer's credentials are
checked again on accept. OVS connects to it as ``unix:PATH``.

os-ken's own StreamServer can bind a unix path but leaves its mode to the umask, and its
Datapath sets TCP_NODELAY, which a unix socket refuses: hence this small server.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from typing import Any

LOG = logging.getLogger("ryu_apps.ofp_unix")


class UnixConn:
    """A unix stream socket that ignores TCP-level options (os-ken sets TCP_NODELAY)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def setsockopt(self, level: int, opt: int, value: Any) -> None:
        if level == socket.IPPROTO_TCP:
            return
        self._sock.setsockopt(level, opt, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def listen(path: str) -> socket.socket:
    """Bind ``path`` with mode 0600 from the start (umask), replacing a stale socket."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def peer_uid(conn: socket.socket) -> int:
    pid_uid_gid = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", pid_uid_gid)[1]


def serve(path: str) -> None:
    """Accept OpenFlow connections on ``path`` forever; hand each to os-ken as a datapath."""
    from os_ken.controller import controller
    from os_ken.lib import hub

    server = listen(path)
    me = os.getuid()
    while True:
        conn, _ = server.accept()
        uid = peer_uid(conn)
        if uid not in (me, 0):  # the mode bits already say so: a second lock on the same door
            LOG.warning("refused an OpenFlow connection from uid %d", uid)
            conn.close()
            continue
        hub.spawn(controller.datapath_connection_factory, UnixConn(conn), path)


def install(path: str) -> None:
    """Make os-ken's OpenFlowController listen on ``path`` (call before the apps start).

    os-ken's CONF must name a TCP port (any; it is never opened): without one,
    OpenFlowController starts a second server loop for the old port 6633, and both
    would bind ``path``.
    """
    from os_ken.controller import controller

    def server_loop(self, *_: Any) -> None:
        try:
            serve(path)
        except BaseException:  # without its listener the app is useless: exit, the agent restarts it
            LOG.exception("OpenFlow listener on %s failed", path)
            logging.shutdown()
            os._exit(1)

    controller.OpenFlowController.server_loop = server_loop
