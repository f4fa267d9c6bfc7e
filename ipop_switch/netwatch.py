"""Wake up when the host's addresses change: one rtnetlink socket per process, no polling.

A laptop that moves to another network, a DHCP lease that changes, an interface that goes
down: the kernel announces each as RTM_NEWADDR / RTM_DELADDR / RTM_NEWLINK on the
rtnetlink multicast groups. We only need to know *that* something changed, not what: the
consumers (a link's ICE session, the XMPP connection) compare the addresses they use
against the host's current ones themselves. So the messages are drained, not parsed
(this is the whole use of netlink here: a library like pyroute2 would add a dependency
for one ``bind``), and a burst of them (an address and its routes) becomes one callback
after ``debounce`` seconds. An idle host costs nothing: the socket sits in the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

log = logging.getLogger(__name__)

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR


class AddressWatch:
    """Calls every subscriber (no arguments) once after each burst of address or link changes.
    ``start`` returns False where netlink is not available (the caller then polls)."""

    def __init__(self, *, debounce: float = 0.1) -> None:
        self.debounce = debounce
        self.changes = 0                 # bursts seen (status, tests)
        self._subs: list[Callable[[], None]] = []
        self._sock: socket.socket | None = None
        self._pending: asyncio.TimerHandle | None = None

    def subscribe(self, fn: Callable[[], None]) -> None:
        self._subs.append(fn)

    def unsubscribe(self, fn: Callable[[], None]) -> None:
        if fn in self._subs:
            self._subs.remove(fn)

    @property
    def running(self) -> bool:
        return self._sock is not None

    def start(self) -> bool:
        if self._sock is not None:
            return True
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                              socket.NETLINK_ROUTE)
            s.bind((0, GROUPS))
        except (OSError, AttributeError) as e:
            log.warning("no rtnetlink address events (%s): address changes are polled instead", e)
            return False
        self._sock = s
        asyncio.get_running_loop().add_reader(s.fileno(), self._readable)
        return True

    def stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            except (RuntimeError, ValueError):
                pass
            self._sock.close()
            self._sock = None

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                if not self._sock.recv(65536):
                    break
            except BlockingIOError:
                break
            except OSError:                # ENOBUFS: we missed some; all the more reason to look
                break
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(self.debounce, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self.changes += 1
        for fn in list(self._subs):
            try:
                fn()
            except Exception:              # one consumer's bug must not silence the others
                log.exception("address change subscriber failed")
