"""Batched system calls for the datapath: UDP GSO sends and UDP GRO receives (TAP offloads: tap.py).

One ``sendmsg`` with ``UDP_SEGMENT`` carries up to 64 equal-size datagrams (the last
may be shorter) of at most 65507 payload bytes in all; one ``recvmsg`` with
``UDP_GRO`` returns several datagrams of one sender glued together, with the
segment size in a control message. ``SOL_UDP`` 17, ``UDP_SEGMENT`` 103 (Linux 4.18),
``UDP_GRO`` 104 (Linux 5.0); a 64 KiB super-frame plus the per-segment overhead does not
fit one GSO send, so the sender splits it into groups. The event loop's transports drop
control messages, so a socket that receives with GRO is read by ``GroTransport``.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
from typing import Callable, Iterator

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65507
_U16 = struct.Struct("=H")
_I32 = struct.Struct("=i")
SOCK_BUF = 4 * 1024 * 1024


def gso_supported() -> bool:
    """True if this kernel accepts UDP_SEGMENT (Linux >= 4.18) and UDP_GRO (>= 5.0)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(SOL_UDP, UDP_SEGMENT, 1400)
        s.setsockopt(SOL_UDP, UDP_GRO, 1)
        return True
    except OSError:
        return False
    finally:
        s.close()


def tune_socket(sock: socket.socket, *, gro: bool) -> None:
    """Large buffers (batched bursts overflow the 208 KiB default) and GRO if asked."""
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            pass
    if gro:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)


def gso_groups(datagrams: list[bytes]) -> Iterator[tuple[list[bytes], int]]:
    """Split a list of datagrams into runs one GSO send can carry: all of one size
    but the last (which may be shorter), at most 64 and 65507 bytes per run."""
    i, n = 0, len(datagrams)
    while i < n:
        size = len(datagrams[i])
        j, total = i, 0
        while j < n and j - i < GSO_MAX_SEGMENTS and total + len(datagrams[j]) <= GSO_MAX_BYTES:
            d = len(datagrams[j])
            if d > size:
                break
            total += d
            j += 1
            if d < size:
                break  # a shorter one ends the run
        if j == i:       # a single datagram larger than the GSO limit: send it alone
            j = i + 1
        yield datagrams[i:j], size
        i = j


def send_batch(sock: socket.socket, datagrams: list[bytes], addr, *, gso: bool = True) -> int:
    """Send datagrams to one address with as few system calls as possible; returns calls made."""
    calls = 0
    if not gso:
        for d in datagrams:
            sock.sendto(d, addr)
            calls += 1
        return calls
    for group, size in gso_groups(datagrams):
        if len(group) == 1:
            sock.sendto(group[0], addr)
        else:
            sock.sendmsg([b"".join(group)], [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))], 0, addr)
        calls += 1
    return calls


def recv_batch(sock: socket.socket, bufsize: int = 65535) -> tuple[list[bytes], tuple] | None:
    """One GRO receive: the datagrams it carried and the sender; None if nothing is waiting."""
    try:
        data, anc, _flags, addr = sock.recvmsg(bufsize, socket.CMSG_SPACE(4))
    except BlockingIOError:
        return None
    seg = gro_size(anc)
    if not seg or seg >= len(data):
        return [data], addr
    return [data[o:o + seg] for o in range(0, len(data), seg)], addr


def gro_size(anc: list) -> int:
    """The segment size (gso_size) of a UDP GRO receive from its control messages; 0 if the
    kernel glued nothing (a single datagram)."""
    for level, typ, val in anc:
        if level == SOL_UDP and typ == UDP_GRO:
            return (_I32 if len(val) >= 4 else _U16).unpack_from(val)[0]
    return 0


# on_datagram(buffer, segment size, sender): a single datagram has size == len(buffer)
OnDatagram = Callable[[bytes, int, tuple], None]
_CMSG = socket.CMSG_SPACE(4)


class GroTransport(asyncio.DatagramTransport):
    """A datagram transport over a UDP socket that reads with ``recvmsg``, so that a UDP
    GRO buffer comes with its segment size (the event loop's own transports drop control
    messages; uvloop's cannot even be paused). Every receive goes to ``on_datagram``, and
    ``on_done`` (if given) is called once the socket is drained or a wake-up's reads are
    done, so that single datagrams can be handled as one burst; a send that finds the
    socket buffer full waits in order for it to drain, and ``close`` ends with
    ``protocol.connection_lost``, as the event loop's transports do. On a connected socket
    (a TURN client's, to its server) ``sendto(data)`` without an address sends to the peer.
    ``read_many(transport)``, if given, does a wake-up's reads instead (ice.py's hook, with
    the C ``recv_many``: many datagrams per system call)."""

    MAX_READS = 64                  # datagrams per wake-up: the other links get their turn

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol,
                 on_datagram: OnDatagram, on_done: Callable[[], None] | None = None,
                 read_many: Callable[["GroTransport"], None] | None = None) -> None:
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        super().__init__({"socket": sock, "sockname": sock.getsockname(), "peername": peer})
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._on_datagram = on_datagram
        self._on_done = on_done
        self._read_many = read_many     # reads a wake-up's datagrams itself (the C recv_many)
        # the Python reader's buffer; with read_many none (64 KiB less per socket of a link)
        self._buf = bytearray(65536) if read_many is None else bytearray()
        self._queue: collections.deque[tuple[bytes, tuple]] = collections.deque()
        self._closing = False
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._read)

    def _read(self) -> None:
        try:
            self._read_some()
        finally:
            if self._on_done is not None:
                self._on_done()

    def _read_some(self) -> None:
        if self._read_many is not None:
            try:
                self._read_many(self)
            except OSError as e:
                self._protocol.error_received(e)
            return
        buf, recv, on = self._buf, self._sock.recvmsg_into, self._on_datagram
        for _ in range(self.MAX_READS):
            try:
                n, anc, _flags, addr = recv((buf,), _CMSG)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._protocol.error_received(e)
                return
            seg = gro_size(anc) if anc else 0
            on(bytes(buf[:n]), seg if 0 < seg < n else n, addr)
            if self._closing:
                return

    def sendto(self, data, addr=None) -> None:
        if self._closing:
            return
        if not self._queue:
            try:
                if addr is None:
                    self._sock.send(data)
                else:
                    self._sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(self._sock.fileno(), self._drain)
            except OSError as e:
                self._protocol.error_received(e)
                return
        self._queue.append((bytes(data), addr))

    def _drain(self) -> None:
        q = self._queue
        while q:
            data, addr = q[0]
            try:
                if addr is None:
                    self._sock.send(data)
                else:
                    self._sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._protocol.error_received(e)
            q.popleft()
        self._loop.remove_writer(self._sock.fileno())

    def is_closing(self) -> bool:
        return self._closing

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        if self._queue:
            self._loop.remove_writer(self._sock.fileno())
            self._queue.clear()
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return sum(len(d) for d, _ in self._queue)
