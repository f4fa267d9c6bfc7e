"""The C socket reader (``_fastpath.recv_many``, ``_recvmany.h``) against the Python one.

ice.py's socket hook reads a link's UDP sockets either with the C ``recv_many`` (many
datagrams per system call, single data packets glued in C) or, without the extension,
with one ``recvmsg`` per datagram and ``_Batch`` in Python. Both must hand exactly the same
calls to the receiver, aioice and aioice's TURN client. Here the same datagrams (data
packets, shorter ones, STUN, handshakes, ChannelData of bound and unbound channels, lies
about lengths, UDP GSO sends that arrive glued by GRO) go over loopback to two sockets,
one read each way through a real ``_Hook``, and the recorded calls are compared.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
from hypothesis import given, settings, strategies as st

from ipop_switch.tunnel import batch_io, codec, ice

fastpath = pytest.importorskip("ipop_switch.tunnel._fastpath")

DATA = codec.TYPE_DATA
SIZE = 1446                                 # one full data packet


class _Inner:
    """aioice's TURN client as the hook sees it: bound channels, and what it is handed."""

    def __init__(self, channels: dict[int, tuple]) -> None:
        self.channel_to_peer = channels
        self.calls: list = []

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.calls.append(("server", data, addr))


class _TurnTransport:
    def __init__(self, inner: _Inner) -> None:
        self._TurnTransport__inner_protocol = inner


class _Protocol:
    """aioice's protocol on a socket (a host socket, or a TURN allocation's)."""

    def __init__(self, calls: list, inner: _Inner | None = None) -> None:
        self.calls = calls
        self.transport = _TurnTransport(inner) if inner is not None else None

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.calls.append(("aioice", data, addr))


class _Tr:
    """What ``read_host``/``read_turn`` use of their GroTransport."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def is_closing(self) -> bool:
        return False


def _hook(channels: dict[int, tuple] | None):
    calls: list = []
    inner = _Inner(channels) if channels is not None else None
    proto = _Protocol(calls, inner)
    hook = ice._Hook(proto, lambda data, seg, addr, _p, other: calls.append(("ours", data, seg, addr, other is not None)))
    if inner is not None:
        inner.calls = calls
    return hook, calls


def _read_python(hook: ice._Hook, sock: socket.socket, turn: bool) -> None:
    """The Python reader: one recvmsg per datagram (GroTransport's loop), then the flush."""
    on = hook.turn_received if turn else hook.received_buffer
    while True:
        try:
            data, anc, _f, addr = sock.recvmsg(65536, socket.CMSG_SPACE(4))
        except BlockingIOError:
            break
        seg = batch_io.gro_size(anc)
        on(data, seg if 0 < seg < len(data) else len(data), addr)
    hook.batch.flush()


def _sock() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setsockopt(batch_io.SOL_UDP, batch_io.UDP_GRO, 1)
    s.setblocking(False)
    return s


def _data(n: int, tag: int) -> bytes:
    return bytes([DATA]) + bytes([tag % 256]) * (n - 1)


# one thing sent: (sender 0/1, kind, size, channel tweak); GSO groups of equal data packets
_item = st.tuples(
    st.sampled_from([0, 0, 0, 1]),                             # runs of one sender are the common case
    st.sampled_from(["data"] * 4 + ["short"] * 2 + ["tiny", "stun", "init", "gso", "empty"]),
    st.integers(32, SIZE),
    st.sampled_from(["bound", "bound2", "unbound", "too_long", "raw"]),
)


def _payloads(kind: str, size: int, i: int) -> list[bytes]:
    if kind == "data":
        return [_data(SIZE, i)]
    if kind == "short":
        return [_data(size, i)]
    if kind == "tiny":                          # first byte of a data packet, too short to be one
        return [bytes([DATA]) * 20]
    if kind == "stun":
        return [b"\x00\x01\x00\x00" + b"s" * 16]
    if kind == "init":
        return [bytes([codec.TYPE_INIT]) + b"h" * 100]
    if kind == "empty":
        return [b""]
    return [_data(SIZE, i + k) for k in range(5)] + [_data(size, i + 9)]      # a GSO group


def _send(tx: list[socket.socket], to: tuple, sender: int, payloads: list[bytes]) -> None:
    if len(payloads) > 1:
        seg = len(payloads[0])
        tx[sender].sendmsg([b"".join(payloads)], [(batch_io.SOL_UDP, batch_io.UDP_SEGMENT, struct.pack("=H", seg))], 0, to)
    else:
        tx[sender].sendto(payloads[0], to)


def _channel_data(chan: int, body: bytes, tweak: str) -> bytes:
    if tweak == "raw":
        return body
    length = len(body) + (7 if tweak == "too_long" else 0)
    pad = b"\x00" * (-len(body) % 4)
    return struct.pack("!HH", chan, length) + body + pad


def _compare(items, turn: bool) -> None:
    rx_c, rx_py = _sock(), _sock()
    tx = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for t in tx:
            t.bind(("127.0.0.1", 0))
        peers = {0x4000: ("198.18.0.9", 4000), 0x4001: ("198.18.0.10", 4001)}
        for i, (sender, kind, size, tweak) in enumerate(items):
            payloads = _payloads(kind, size, i)
            if turn:
                chan = {"bound": 0x4000, "bound2": 0x4001, "unbound": 0x4005}.get(tweak, 0x4000)
                payloads = [_channel_data(chan, p, tweak) for p in payloads]
                if len(payloads) > 1 and len({len(p) for p in payloads[:-1]}) > 1:
                    payloads = payloads[:1]
            for rx in (rx_c, rx_py):
                _send(tx, rx.getsockname(), sender, payloads)
        hook_c, calls_c = _hook(peers if turn else None)
        hook_py, calls_py = _hook(peers if turn else None)
        (hook_c.read_turn if turn else hook_c.read_host)(_Tr(rx_c))
        _read_python(hook_py, rx_py, turn)
        assert calls_c == calls_py
        with pytest.raises(BlockingIOError):            # everything was read
            rx_c.recv(65536)
    finally:
        for s in (rx_c, rx_py, *tx):
            s.close()


@settings(max_examples=150, deadline=None)
@given(st.lists(_item, min_size=1, max_size=14))
def test_host_socket_read_in_c_makes_the_same_calls_as_in_python(items):
    _compare(items, turn=False)


@settings(max_examples=150, deadline=None)
@given(st.lists(_item, min_size=1, max_size=14))
def test_turn_socket_read_in_c_makes_the_same_calls_as_in_python(items):
    _compare(items, turn=True)


def test_single_data_packets_of_one_sender_come_as_one_run_per_call():
    """The point of it: 40 single datagrams of one sender are read in one call, as one run
    (a shorter one ends a run), with the sender's address as Python's socket module gives it."""
    tx, rx6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM), socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        rx6.bind(("::1", 0))
        rx6.setblocking(False)
        sent = [_data(SIZE, i) for i in range(30)] + [_data(700, 99)] + [_data(SIZE, i) for i in range(9)]
        for d in sent:
            tx.sendto(d, rx6.getsockname())
        out = fastpath.recv_many(rx6.fileno())
        assert [(k, len(d), s) for k, d, s, _ in out] == [(0, 30 * SIZE + 700, SIZE), (0, 9 * SIZE, SIZE)]
        assert b"".join(d for _, d, _, _ in out) == b"".join(sent)
        tx.sendto(b"x", rx6.getsockname())
        [(kind, data, seg, addr)] = fastpath.recv_many(rx6.fileno())
        assert (kind, data, seg) == (1, b"x", 1)
        tx.sendto(b"x", rx6.getsockname())
        assert addr == rx6.recvfrom(10)[1]             # ('::1', port, flowinfo, scope_id), as Python gives it
        assert fastpath.recv_many(rx6.fileno()) == []
    finally:
        for s in (tx, rx6):
            s.close()


def test_errors_and_limits():
    """A socket error with nothing read raises (the transport hands it to the protocol); at
    most ``max`` datagrams are read per call, the rest stay for the next; a bad argument is
    a TypeError, not a crash."""
    rx, tx = _sock(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tx.connect(rx.getsockname())
        for i in range(20):
            tx.send(_data(SIZE, i))
        first = fastpath.recv_many(rx.fileno(), None, 8)
        assert sum(len(d) for _, d, _, _ in first) == 8 * SIZE
        rest = fastpath.recv_many(rx.fileno())
        assert sum(len(d) for _, d, _, _ in rest) == 12 * SIZE
        with pytest.raises(TypeError):
            fastpath.recv_many(rx.fileno(), [1, 2])
        with pytest.raises(OSError):
            fastpath.recv_many(-1)
        closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed.bind(("127.0.0.1", 0))
        tx2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx2.bind(("127.0.0.1", 0))
        tx2.connect(closed.getsockname())
        closed.close()
        tx2.send(b"to nobody")                          # ICMP port unreachable comes back
        time.sleep(0.05)
        with pytest.raises(ConnectionRefusedError):
            fastpath.recv_many(tx2.fileno())
        tx2.close()
    finally:
        rx.close()
        tx.close()
