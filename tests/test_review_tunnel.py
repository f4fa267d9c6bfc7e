"""Regression tests for the tunnel's findings of the security review (findings 2, 7, 9
and 10). Each failed on the code before its fix:

- 7: the UDP GRO splitter guessed the segment size from the first datagram, so one
  foreign datagram in front of a burst failed the whole burst.
- 2: any datagram starting with the handshake type, from anywhere, spent the link's
  shared handshake budget before being parsed: a flood starved handshakes and rekeys.

- 9: the C objects used uninitialised (or after a failed second ``__init__``) crashed the
  process (SIGFPE, SIGSEGV); now every method raises.
- 10: a forged packet in a burst was decrypted twice (in C, then again in Python).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from ipop_switch.tunnel import accel, batch_io, codec, ice
from ipop_switch.tunnel import handshake as hs
from ipop_switch.tunnel.datapath import Datapath
from ipop_switch.tunnel.ice import Path
from ipop_switch.tunnel.keys import Keys
from ipop_switch.tunnel.link import LinkWorker, State
from ipop_switch.tunnel.messages import LinkSpec

from test_fastpath import _BYTES, receiver, wire_of

fp = accel.fastpath or importlib.import_module("ipop_switch.tunnel._fastpath")


# -- finding 9: C objects used uninitialised -----------------------------------------------
_PRELUDE = """
import importlib, os
fp = importlib.import_module("ipop_switch.tunnel._fastpath")
def raises(f, exc):
    try:
        f()
    except exc as e:
        print("raised", type(e).__name__)
        return
    print("returned")
# a layout seal_tcp takes (Ethernet, a 40-byte IP header, TCP at 54, payload at 74, 100-byte
# segments): segment 0 is 16 + 74 + 100 + 16 = 206 bytes
SEAL_ARGS = (bytes(200), 74, 54, 100, 0, 1, 0, bytes(8), bytes(8), bytearray(400))
"""

MISUSES = {
    "RxState.__new__ then update": "raises(lambda: fp.RxState.__new__(fp.RxState).update(5), RuntimeError)",
    "RxState.__new__ then check": "raises(lambda: fp.RxState.__new__(fp.RxState).check(5), RuntimeError)",
    "TxKey.__new__ then seal_tcp": (
        "raises(lambda: fp.TxKey.__new__(fp.TxKey).seal_tcp(*SEAL_ARGS), RuntimeError)"),
    "open_burst with an uninitialised RxState": (
        "raises(lambda: fp.FastRx().open_burst(fp.RxState.__new__(fp.RxState), b'abcd',"
        " b'\\xe3' * 64, 0, 64, []), RuntimeError)"),
    # a failed second __init__ keeps the working state it had
    "RxState failed second __init__": (
        "r = fp.RxState(os.urandom(32)); raises(lambda: r.__init__(b'short'), ValueError); "
        "print('update', r.update(7), r.update(7), r.highest)"),
    "TxKey failed second __init__": (
        "k = fp.TxKey(os.urandom(32)); raises(lambda: k.__init__(b'short'), ValueError); "
        "print('sealed', k.seal_tcp(*SEAL_ARGS))"),
}
EXPECTED = {
    "RxState.__new__ then update": "raised RuntimeError",
    "RxState.__new__ then check": "raised RuntimeError",
    "TxKey.__new__ then seal_tcp": "raised RuntimeError",
    "open_burst with an uninitialised RxState": "raised RuntimeError",
    "RxState failed second __init__": "raised ValueError\nupdate True False 7",
    "TxKey failed second __init__": "raised ValueError\nsealed 206",     # the key is still there
}


@pytest.mark.parametrize("name", sorted(MISUSES))
def test_c_objects_used_uninitialised_raise_instead_of_crashing(name):
    """Each misuse in its own interpreter, so a crash fails the test instead of pytest."""
    code = textwrap.dedent(_PRELUDE) + MISUSES[name] + "\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "IPSW_NO_ACCEL"})
    assert r.returncode == 0, f"{name}: exit {r.returncode} (a negative one is the signal) {r.stderr[-400:]}"
    assert r.stdout.strip() == EXPECTED[name], r.stdout


# -- finding 10: a forged packet costs one decryption -------------------------------------
class CountingAEAD:
    """The session's Python receive AEAD, counting the decryptions asked of it."""

    def __init__(self, aead) -> None:
        self.aead = aead
        self.calls = 0

    def decrypt(self, nonce, data, aad):
        self.calls += 1
        return self.aead.decrypt(nonce, data, aad)


@pytest.mark.parametrize("forged", [0, 4, 9])
def test_a_forged_segment_in_a_burst_is_decrypted_once_and_counted(forged):
    """A GRO burst of 10 TCP segments with one forged tag: the C loop decrypts it once,
    counts it (``auth``) and goes on; the Python path never sees it; the 9 genuine
    segments are delivered."""
    keys = (os.urandom(32), os.urandom(32))
    wire = wire_of(keys, [(0, _BYTES[:10 * 1000], "A", 1000)])
    assert len(wire) == 10 and len({len(d) for d in wire}) == 1
    bad = bytearray(wire[forged])
    bad[-1] ^= 1
    wire[forged] = bytes(bad)

    async def go():
        dp, tap = receiver(keys, True)
        try:
            s = dp.table.by_index[22]
            py = s.recv_aead = CountingAEAD(s.recv_aead)
            dp.receive(b"".join(wire), len(wire[0]), ("198.18.0.9", 1), None, None)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            frames = tap.frames()
            return py.calls, dict(dp.stats.drops), dp.stats.rx_packets, frames
        finally:
            tap.close()

    calls, drops, rx_packets, frames = asyncio.run(go())
    assert calls == 0, "the forged packet was decrypted again in Python"
    assert drops == {"auth": 1}
    assert rx_packets == 9
    assert sum(len(f) - 54 for _, f in frames) == 9 * 1000     # Ethernet + IPv4 + TCP: 54 bytes each


# -- finding 2: handshake floods --------------------------------------------------------
ATTACKER = ("198.18.0.66", 40000)      # any other address: the datagrams are spoofable


class Endpoint:
    """One end's UDP socket on loopback, standing in for the aioice protocol the datagram
    came in on (``reply`` sends on ``protocol.transport``)."""

    def __init__(self) -> None:
        self.transport = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.transport.bind(("127.0.0.1", 0))
        self.transport.settimeout(2.0)
        self.addr = self.transport.getsockname()

    def recv(self) -> tuple[bytes, tuple] | None:
        try:
            return self.transport.recvfrom(4096)
        except socket.timeout:
            return None

    def close(self) -> None:
        self.transport.close()


class End:
    """A link worker's handshake side as ``LinkWorker.start`` sets it up, with a socket pair
    for its TAP and a loopback UDP socket for its ICE pair."""

    def __init__(self, controlling: bool, static: X25519PrivateKey, peer: X25519PrivateKey) -> None:
        raw = static.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        spec = LinkSpec(link_id="l-review", peer_id="peer", controlling=controlling, local_static=raw,
                        peer_static=hs.pub_bytes(peer), tap="ipsw-review")
        self.w = w = LinkWorker(spec, lambda msg: None)
        self.tap, self._tap_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        w.dp = Datapath(self.tap.fileno(), w.stats, w._on_control, w._on_handshake_packet)
        w.dp.set_on_confirm(w._on_confirm)
        w.keys = Keys(static, hs.pub_bytes(peer), spec.link_id, w.timers, w.stats, w.dp.table)
        w.keys.set_prologue("ufragA", "ufragB")
        w.state = State.HANDSHAKE
        self.ep = Endpoint()

    def connect(self, other: "End") -> None:
        """Send to ``other``; once up, the selected pair's remote address is ``other``'s."""
        ep, to = self.ep, other.ep.addr
        self.w.dp.send = lambda d: ep.transport.sendto(d, to)
        self.w.path = Path(self.w.dp.send, "direct", f"host {ep.addr[0]}:{ep.addr[1]}",
                           f"host {to[0]}:{to[1]}", ep, to)

    def deliver(self, data: bytes, addr: tuple) -> None:
        """A datagram from ``addr`` as the socket hook hands it over."""
        self.w.dp.datagram(data, addr, self.ep)

    def receive_until(self, type_: int) -> tuple[bytes, tuple] | None:
        """Take what arrived at our socket (data packets go in as usual) up to the first
        datagram of ``type_``, which is returned undelivered; None after 2 s of silence."""
        while True:
            got = self.ep.recv()
            if got is None or got[0][:1] == bytes([type_]):
                return got
            self.deliver(*got)

    def close(self) -> None:
        self.ep.close()
        self.tap.close()
        self._tap_peer.close()


@pytest.fixture
def ends():
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    i, r = End(True, a, b), End(False, b, a)
    i.connect(r)
    r.connect(i)
    yield i, r
    i.close()
    r.close()


def handshake(i: End, r: End) -> tuple[bytes, bool]:
    """The initiator sends an initiation over loopback, the responder answers it, the
    initiator takes the response. Returns the initiation and whether a session came of it."""
    before = i.w.dp.current
    i.w.keys.start()
    i.w.keys.tick(i.w.dp.send)
    got = r.receive_until(codec.TYPE_INIT)
    assert got is not None, "the initiation was not sent"
    r.deliver(*got)
    resp = i.receive_until(codec.TYPE_RESP)
    if resp is None:
        return got[0], False
    i.deliver(*resp)
    return got[0], i.w.dp.current is not None and i.w.dp.current is not before


def with_mac1(to: End, msg: bytes) -> bytes:
    """``msg`` with the mac1 WireGuard defines (keyed BLAKE2s-128, key = BLAKE2s-256 of
    "mac1----" and the receiver's static public key), computed here from the spec."""
    key = hashlib.blake2s(b"mac1----" + hs.pub_bytes(to.w.keys.static)).digest()
    return msg + hashlib.blake2s(msg, key=key, digest_size=16).digest()


def junk(r: End, n: int, replay: bytes | None = None) -> list[bytes]:
    """``n`` handshake-type datagrams a stranger can make: one byte, wrong lengths, the
    right length with a bad mac1, a valid mac1 over a junk body (it knows the responder's
    public key), and replays of a genuine initiation when given."""
    shapes = [
        lambda: bytes([codec.TYPE_INIT]),
        lambda: bytes([codec.TYPE_INIT]) + os.urandom(115),
        lambda: bytes([codec.TYPE_INIT, 0, 0, 0]) + os.urandom(128),
        lambda: with_mac1(r, bytes([codec.TYPE_INIT, 0, 0, 0]) + os.urandom(112)),
    ]
    if replay is not None:
        shapes.append(lambda: replay)
    return [shapes[k % len(shapes)]() for k in range(n)]


def test_a_first_handshake_completes_through_a_flood_of_junk(ends):
    """2000 unauthenticated handshake-type datagrams from another address, faster than the
    shared budget, then the peer's initiation: it is answered. The junk is counted by why."""
    i, r = ends
    for d in junk(r, 2000):
        r.deliver(d, ATTACKER)
    _, ok = handshake(i, r)
    drops = r.w.stats.drops
    assert ok, f"the handshake did not complete: {dict(drops)}"
    assert drops["handshake_malformed"] >= 1000 and drops["handshake_mac"] >= 400, dict(drops)
    assert drops["handshake_source_limit"] >= 400, dict(drops)   # mac1 right: one source's share
    assert r.w.stats.handshakes == 1


def test_a_rekey_completes_through_a_flood_while_up(ends):
    """Up, a flood from another address (junk, and replays of the peer's genuine
    initiation) is refused by address before anything else; the rekey completes."""
    i, r = ends
    first, ok = handshake(i, r)
    assert ok
    i.w.state = r.w.state = State.UP
    for d in junk(r, 2000, replay=first):
        r.deliver(d, ATTACKER)
    _, ok = handshake(i, r)
    assert ok, f"the rekey did not complete: {dict(r.w.stats.drops)}"
    assert r.w.stats.drops["handshake_source"] == 2000, dict(r.w.stats.drops)
    assert r.w.stats.handshakes == 2


def test_one_source_cannot_use_the_shared_budget(ends):
    """Not up yet (any address may start a handshake): a source sending valid-looking
    initiations as fast as it can gets a few a second, so the peer still gets an answer."""
    i, r = ends
    for _ in range(200):
        r.deliver(with_mac1(r, bytes([codec.TYPE_INIT, 0, 0, 0]) + os.urandom(112)), ATTACKER)
    drops = r.w.stats.drops
    assert drops["handshake_auth"] <= 10 and drops["handshake_source_limit"] >= 190, dict(drops)
    assert handshake(i, r)[1]


def test_the_source_table_is_bounded():
    from ipop_switch.tunnel.admission import SourceLimiter
    lim = SourceLimiter(rate=5, burst=5, max_sources=100)
    assert all(lim.allow(f"198.18.1.{k}", now=0.0) for k in range(100))
    assert not lim.allow("198.18.2.1", now=0.1)            # full, nobody refilled: refused
    assert len(lim) == 100
    assert lim.allow("198.18.2.1", now=1.0) and len(lim) == 1     # all refilled: forgotten
    assert [lim.allow("198.18.2.1", now=1.0) for _ in range(6)] == [True] * 4 + [False] * 2


# -- finding 7: the GRO segment size comes from the kernel ---------------------------------
class Recorder(asyncio.DatagramProtocol):
    """Stands in for aioice's protocol on the socket: what is not ours ends up here."""

    def __init__(self) -> None:
        self.other: list[bytes] = []
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        self.other.append(data)


def run_on(loop_kind: str, coro):
    if loop_kind == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
            return r.run(coro)
    return asyncio.run(coro)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("foreign", ["same session, bad counter", "another session"])
@pytest.mark.parametrize("c_loops", [True, False])
def test_a_gro_burst_behind_a_foreign_datagram_is_delivered(loop_kind, foreign, c_loops):
    """One GSO send over loopback to a hooked socket with UDP GRO on: a datagram of the same
    size that is not the burst's (spoofed, or of another session after a rekey) in front of
    ten genuine segments. The burst is cut where the kernel says, so only that one is
    dropped, the ten are delivered; a STUN-type datagram still reaches aioice's protocol."""
    keys = (os.urandom(32), os.urandom(32))
    wire = wire_of(keys, [(0, _BYTES[:10 * 1000], "A", 1000)])
    size = len(wire[0])
    assert len(wire) == 10 and all(len(d) == size for d in wire)
    c0 = int.from_bytes(wire[0][8:16], "big")
    if foreign == "another session":
        first = wire[0][:4] + os.urandom(4) + os.urandom(size - 8)
        reason = "unknown_index"
    else:
        first = wire[0][:8] + (c0 + 100).to_bytes(8, "big") + os.urandom(size - 16)
        reason = "auth"

    async def go():
        loop = asyncio.get_running_loop()
        dp, tap = receiver(keys, c_loops)
        tr, proto = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            ice.install_hook(proto, dp.receive)
            assert ice.enable_gro(proto)
            to = proto.transport.get_extra_info("sockname")
            assert batch_io.send_batch(tx, [first] + wire, to) == 1        # one GSO send
            tx.sendto(b"\x00\x01" + os.urandom(30), to)                    # not ours: aioice's
            frames, deadline = [], loop.time() + 3
            while sum(len(f) - 54 for _, f in frames) < 10 * 1000 and loop.time() < deadline:
                await asyncio.sleep(0.01)
                frames += tap.frames()
            while not proto.other and loop.time() < deadline:
                await asyncio.sleep(0.01)
            return frames, dict(dp.stats.drops), dp.stats.rx_packets, proto.other
        finally:
            tx.close()
            proto.transport.close()
            tap.close()

    frames, drops, rx_packets, other = run_on(loop_kind, go())
    assert drops == {reason: 1}, drops
    assert rx_packets == 10
    assert sum(len(f) - 54 for _, f in frames) == 10 * 1000
    assert len(other) == 1 and other[0][:2] == b"\x00\x01"
