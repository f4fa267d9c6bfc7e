"""A TAP device stand-in for datapath unit tests (no namespaces, no root needed)."""

from __future__ import annotations

import socket

from ipop_switch.tunnel import gso


class SeqTap:
    """Stand-in for a TAP device with a vnet header: ``fd`` is the datapath's end, ``kernel`` the
    other; SOCK_SEQPACKET keeps frame boundaries as a TAP does."""

    def __init__(self, buf: int = 4 << 20) -> None:
        self.dp_end, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.dp_end, self.kernel):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buf)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buf)
            s.setblocking(False)
        self.fd = self.dp_end.fileno()
        self.vnet = True
        self.tso = False

    def set_offloads(self, tso: bool) -> bool:
        self.tso = tso
        return tso

    def frames(self) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            try:
                r = self.kernel.recv(1 << 17)
            except BlockingIOError:
                return out
            out.append((r[:gso.VNET_LEN], r[gso.VNET_LEN:]))

    def close(self) -> None:
        self.dp_end.close()
        self.kernel.close()
