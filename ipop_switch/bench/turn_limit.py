"""coturn's own relay limit on this machine: a plain UDP blast through one TURN allocation.

The relayed figure of the bench means little without what the TURN server itself can relay
here, on the same two cores: this tool measures it without any of our code in the path.
A *client* (a TURN allocation over UDP, made with aioice's TURN client, one channel bound to
the peer) and a *peer* (a plain UDP socket) run as two processes in two lab hosts; one of
them blasts equal-size datagrams for a few seconds, the other counts what arrives:

- ``to-client``: the peer sends plain UDP to the relayed address; coturn wraps each datagram
  in ChannelData and sends it to the client (the direction of the bench's relayed iperf3,
  whose receiver is the host with the allocation);
- ``from-client``: the client sends ChannelData (4-byte header + datagram) to coturn, which
  sends the datagram on to the peer.

Senders use UDP GSO (64 equal datagrams per ``sendmsg``; from the client each with its
ChannelData header, laid out back to back) so the sender is never what limits: the figure is
what coturn forwards when offered more than it can. Receivers count datagrams and bytes
between the first and the last arrival. Datagrams are 1446 bytes, the size of one of our data
packets carrying a full 1400-byte-MTU frame (Ethernet 14 + 1400 + header and tag 32).

Run by the bench (``measure``) with ``python -m ipop_switch.bench.turn_limit client|peer``
inside the hosts' namespaces; the roles talk to the parent by JSON lines on stdin/stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from .measure import cpu_seconds

PAYLOAD = 1446                  # one data packet of ours for a full 1400-MTU frame
SOL_UDP, UDP_SEGMENT = 17, 103
GSO_SEGMENTS = 40               # per sendmsg: 40 x 1450 bytes < 65507
CHANNEL = 0x4000
PUNCH = b"\x00punch"            # first byte 0: not ChannelData (64..79), not STUN-looking either
SETUP_TIMEOUT = 10.0


def _line(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _read_line(timeout: float = SETUP_TIMEOUT) -> dict:
    import select
    r, _, _ = select.select([sys.stdin], [], [], timeout)
    if not r:
        raise TimeoutError("no instruction from the parent")
    line = sys.stdin.readline()
    if not line:
        raise EOFError("parent closed stdin")
    return json.loads(line)


def _blast(sock: socket.socket, unit: bytes, seconds: float, addr=None, rate: float = 0) -> dict:
    """Send ``unit`` (one datagram, with its ChannelData header if any) for ``seconds``, at
    ``rate`` datagrams a second (0: as fast as GSO allows; an unthrottled sender takes a
    core from coturn on two cores, so the bench also offers paced rates); a full socket
    buffer waits (select) rather than spinning."""
    import select
    sock.setblocking(False)
    buf = unit * GSO_SEGMENTS
    cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(unit)))]
    sent = calls = 0
    start = time.monotonic()
    end = start + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if rate:
            ahead = sent + GSO_SEGMENTS - rate * (now - start)
            if ahead > 0:
                time.sleep(ahead / rate)
                continue
        try:
            if addr is None:
                sock.sendmsg([buf], cmsg)
            else:
                sock.sendmsg([buf], cmsg, 0, addr)
            sent += GSO_SEGMENTS
            calls += 1
        except BlockingIOError:
            select.select([], [sock], [], 0.05)
        except OSError:           # e.g. ECONNREFUSED from an ICMP error: keep offering
            pass
    return {"sent": sent, "sendmsg": calls}


def _count(sock: socket.socket, seconds: float, hdr: int, idle: float = 0.5) -> dict:
    """Count datagrams of the blast (``hdr``: ChannelData header bytes to discount) until
    ``idle`` s without one, or ``seconds`` + 2 s after the first."""
    sock.settimeout(idle)
    buf = bytearray(65536)
    n = nbytes = 0
    first = last = 0.0
    start = time.monotonic()
    deadline = start + seconds + SETUP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            k = sock.recv_into(buf)
        except socket.timeout:
            if n:
                break
            continue
        if k - hdr != PAYLOAD:
            continue              # a punch or a stray
        last = time.monotonic()
        if not n:
            first = last
            deadline = first + seconds + 2.0
        n += 1
        nbytes += k - hdr
    span = last - first
    return {"received": n, "bytes": nbytes, "span_s": round(span, 3),
            "mbit": round(nbytes * 8 / span / 1e6, 1) if span > 0 else 0.0,
            "pps": round(n / span) if span > 0 else 0}


# -- the roles (each runs in a lab host's namespace) ------------------------------------

def run_peer(server: tuple[str, int]) -> None:
    """Learn our mapped address (STUN binding to the TURN server from the blast's socket),
    tell the parent, wait for the relayed address, punch our NAT towards it, then blast or
    count as told."""
    from aioice import stun
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.settimeout(1.0)
    req = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    mapped = None
    for _ in range(5):
        sock.sendto(bytes(req), server)
        try:
            data, _ = sock.recvfrom(2048)
        except socket.timeout:
            continue
        msg = stun.parse_message(data)
        mapped = msg.attributes.get("XOR-MAPPED-ADDRESS")
        break
    if mapped is None:
        raise TimeoutError("no STUN answer from the TURN server")
    _line({"mapped": list(mapped)})
    task = _read_line()
    relayed = tuple(task["relayed"])
    # punch: our NAT lets the relay's datagrams in only after we sent to it
    sock.settimeout(0.1)
    end = time.monotonic() + SETUP_TIMEOUT
    heard = False
    while time.monotonic() < end and not heard:
        sock.sendto(PUNCH, relayed)
        try:
            heard = sock.recv(2048) == PUNCH
        except socket.timeout:
            pass
    if not heard:
        raise TimeoutError("the client's punch answer never came through the relay")
    _line({"ready": True})
    while (go := _read_line(600))["mode"] != "stop":
        if go["mode"] == "send":
            _line(_blast(sock, bytes(PAYLOAD), go["seconds"], relayed, go.get("rate", 0)))
        else:
            _line(_count(sock, go["seconds"], 0))


async def _allocate(server: tuple[str, int], user: str, password: str, peer: tuple[str, int]):
    from aioice import turn

    got: asyncio.Queue = asyncio.Queue()

    class Receiver(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple) -> None:
            got.put_nowait(data)

    transport, _ = await turn.create_turn_endpoint(Receiver, server, user, password)
    inner = transport._TurnTransport__inner_protocol       # its UDP socket, for the blast
    await inner.channel_bind(CHANNEL, peer)
    inner.channel_to_peer[CHANNEL] = peer
    inner.peer_to_channel[peer] = CHANNEL
    return transport, inner, got


def run_client(server: tuple[str, int], user: str, password: str, peer: tuple[str, int]) -> None:
    """Allocate, bind a channel to the peer, tell the parent the relayed address, answer
    the peer's punch through the relay, then blast or count as told (on the allocation's
    own UDP socket, outside the event loop)."""
    loop = asyncio.new_event_loop()
    transport, inner, got = loop.run_until_complete(_allocate(server, user, password, peer))
    _line({"relayed": list(transport.get_extra_info("sockname"))})
    data = loop.run_until_complete(asyncio.wait_for(got.get(), SETUP_TIMEOUT))
    if data != PUNCH:
        raise ValueError("unexpected first datagram")
    hdr = struct.pack("!HH", CHANNEL, len(PUNCH))
    for _ in range(3):
        inner._send(hdr + PUNCH)
    go = _read_line()
    raw = inner.transport.get_extra_info("socket")
    sock = socket.socket(fileno=__import__("os").dup(raw.fileno()))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    unit = struct.pack("!HH", CHANNEL, PAYLOAD) + bytes(PAYLOAD)
    while go["mode"] != "stop":
        if go["mode"] == "send":            # connected to the server: no address
            _line(_blast(sock, unit, go["seconds"], None, go.get("rate", 0)))
        else:
            _line(_count(sock, go["seconds"], 4))
        go = _read_line(600)
    sock.close()
    try:
        loop.run_until_complete(asyncio.wait_for(inner.delete(), 3.0))
    except Exception:
        pass


# -- the parent (the bench) ------------------------------------------------------------

def schedule_first(pid: int, priority: int = 10) -> int:
    """Put every thread of the TURN server (``pid``) on SCHED_FIFO: it then runs as soon as a
    datagram wakes it, as a TURN server on its own machine would, instead of waiting for one
    of the two cores it shares in the lab with both nodes, their OVS and iperf3 (its relayed
    ports' 64 KiB buffers overflow meanwhile: docs/benchmarks.md). The kernel's real-time
    throttling (``sched_rt_runtime_us``) still leaves the others 5 % of each core. Returns how
    many threads were changed; raises OSError if not permitted."""
    n = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setscheduler(int(task.name), os.SCHED_FIFO, os.sched_param(priority))
            n += 1
        except ProcessLookupError:      # a thread that ended meanwhile
            pass
    return n


def measure(lab, client_host: str, peer_host: str, *, directions: tuple[str, ...] = ("to-client",),
            seconds: float = 3.0, start_pps: float = 40000, step: float = 1.25, max_steps: int = 8) -> dict:
    """coturn's limit between ``client_host`` (the allocation) and ``peer_host`` (a plain
    socket), per direction (``to-client``, ``from-client``): one unthrottled blast, then
    blasts paced from ``start_pps`` up by ``step`` until more than 10 % is lost or less than
    90 % of the rate arrives (an unthrottled sender takes CPU coturn needs, so its figure
    is lower than coturn's best). Returns per direction the best trial
    (``mbit`` of datagram payload the receiver counted, ``pps``, ``offered``, ``lost_pct``,
    coturn's CPU in cores busy) and every trial."""
    for d in directions:
        if d not in ("to-client", "from-client"):
            raise ValueError(f"direction must be to-client or from-client, not {d!r}")
    turn = lab.services()["turn"]
    server = f"{turn['address']}:{turn['port']}"
    pid = turn.get("pid")
    py = [sys.executable, "-m", "ipop_switch.bench.turn_limit"]
    kw = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    peer = lab.popen(peer_host, [*py, "peer", server], **kw)
    client = None

    def read(p: subprocess.Popen, what: str, timeout: float = SETUP_TIMEOUT) -> dict:
        import select
        r, _, _ = select.select([p.stdout], [], [], timeout)
        line = p.stdout.readline() if r else ""
        if not line:
            p.kill()
            err = p.stderr.read()[-500:] if p.poll() is not None else ""
            raise RuntimeError(f"turn_limit: no {what} from the {'peer' if p is peer else 'client'}: {err}")
        return json.loads(line)

    def write(p: subprocess.Popen, obj: dict) -> None:
        p.stdin.write(json.dumps(obj) + "\n")
        p.stdin.flush()

    def trial(direction: str, rate: float) -> dict:
        sender, receiver = (peer, client) if direction == "to-client" else (client, peer)
        write(receiver, {"mode": "recv", "seconds": seconds})
        time.sleep(0.2)
        c0 = cpu_seconds([pid]) if pid else 0.0
        t0 = time.monotonic()
        write(sender, {"mode": "send", "seconds": seconds, "rate": rate})
        offered = read(sender, "send result", seconds + SETUP_TIMEOUT)
        took = time.monotonic() - t0
        c1 = cpu_seconds([pid]) if pid else 0.0
        got = read(receiver, "count", SETUP_TIMEOUT + 5)
        sent = offered["sent"]
        return {"rate": round(rate), **got, "offered": sent,
                "lost_pct": round(100 * (1 - got["received"] / sent), 1) if sent else None,
                "coturn_cpu": round((c1 - c0) / took, 2) if pid else None}

    try:
        mapped = read(peer, "mapped address")["mapped"]
        client = lab.popen(client_host, [*py, "client", server, turn["user"], turn["password"],
                                         f"{mapped[0]}:{mapped[1]}"], **kw)
        relayed = read(client, "allocation", 2 * SETUP_TIMEOUT)["relayed"]
        write(peer, {"relayed": relayed})
        read(peer, "punch through the relay")
        out: dict = {"payload": PAYLOAD, "seconds": seconds}
        for d in directions:
            trials = [trial(d, 0.0)]
            rate = start_pps
            for _ in range(max_steps):          # paced, rising while coturn keeps up
                t = trial(d, rate)
                trials.append(t)
                if t["lost_pct"] is None or t["lost_pct"] > 10 or t["pps"] < 0.9 * rate:
                    break
                rate *= step
            best = max(trials, key=lambda t: t["mbit"])
            out[d] = {**best, "trials": trials}
        for p in (peer, client):
            write(p, {"mode": "stop"})
        return out
    finally:
        for p in (peer, client):
            if p is not None:
                try:
                    p.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)


def main(argv: list[str]) -> None:
    def hp(s: str) -> tuple[str, int]:
        h, p = s.rsplit(":", 1)
        return h, int(p)
    if argv[:1] == ["peer"]:
        run_peer(hp(argv[1]))
    elif argv[:1] == ["client"]:
        run_client(hp(argv[1]), argv[2], argv[3], hp(argv[4]))
    else:
        sys.exit("usage: python -m ipop_switch.bench.turn_limit peer SERVER | client SERVER USER PASSWORD PEER")


if __name__ == "__main__":
    main(sys.argv[1:])
