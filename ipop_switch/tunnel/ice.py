"""ICE for one link attempt, around aioice: gathering with an interface filter, a relay-last
check order, the selected pair as a send function, and TURN channel refreshes.

aioice does the RFC 8445 work (checks, nomination, role conflicts) and TURN allocation
refreshes (its RFC 7675 consent checks are stopped once a pair is selected: the link's own
authenticated keepalives replace them). What we add:
- gathering leaves out the overlay's own interfaces and other VPNs (``exclude`` by name,
  and any TUN/TAP or WireGuard device: ``is_tunnel_device``);
- the controlling side delays checks on pairs that involve a relay by ``relay_delay``,
  because aioice nominates aggressively (the first pair that answers wins) and a relay
  pair must not beat a direct pair whose first check is still punching through a NAT;
- data bypasses ``Connection.send``/``recv`` (a task or queue per packet): the datapath
  sends on the selected pair's transport, or straight into the TURN channel, or (direct
  paths) through a dup of the pair's socket with UDP GSO (``Path.dup_socket``);
- one hook per socket (``install_hook``) takes our packets off before aioice's STUN
  parser sees them; on host sockets it reads the socket itself (``batch_io.GroTransport``
  in place of the event loop's transport), so that once UDP GRO is on (``enable_gro``)
  the glued datagrams of a burst are split at the size the kernel reports;
- stray non-STUN datagrams are counted instead of queued (aioice would queue them
  until someone calls recv(), which we never do).

Every use of aioice's internals (private attributes, its protocols and transports) is in
this module.
"""

from __future__ import annotations

import asyncio
import fnmatch
import importlib.machinery
import importlib.util
import ipaddress
import logging
import os
import re
import secrets
import socket
import string
import struct
import sys
import types
from dataclasses import dataclass
from typing import Callable



class _DeferredMdns(types.ModuleType):
    """Stand-in for ``aioice.mdns``: aioice imports it for remote candidates named ``*.local``,
    and with it dnspython, importlib.metadata and email (~4 MB in every worker process). No
    ipop-switch node sends such a candidate (ours carry addresses); the one check aioice makes
    per candidate is answered here with aioice's own pattern, anything else loads the true
    module (``create_mdns_protocol`` for a ``.local`` candidate from some other peer)."""

    MDnsProtocol = object                               # an annotation and a cast, nothing more
    _pattern = re.compile(r"^[a-zA-Z0-9-]{1,63}\.local$")  # aioice.mdns.MDNS_HOSTNAME_RE

    def is_mdns_hostname(self, name: str) -> bool:
        return self._pattern.match(name) is not None

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        spec = importlib.machinery.PathFinder.find_spec("aioice.mdns", sys.modules["aioice"].__path__)
        real = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(real)
        sys.modules["aioice.mdns"] = real
        return getattr(real, attr)


if "aioice" not in sys.modules:
    sys.modules.setdefault("aioice.mdns", _DeferredMdns("aioice.mdns"))

import aioice  # noqa: E402
import ifaddr  # noqa: E402
from aioice import ice as aioice_ice  # noqa: E402
from aioice.candidate import Candidate  # noqa: E402

from . import accel, batch_io, codec  # noqa: E402

log = logging.getLogger(__name__)

# Interfaces never used for candidates: our own TAPs and bridges, other VPNs, containers.
DEFAULT_EXCLUDE = ("lo", "ipsw*", "ipt*", "ovs-*", "tun*", "tap*", "wg*", "zt*", "tinc*", "nebula*",
                   "tailscale*", "docker*", "veth*br*", "virbr*")
TURN_CHANNEL_REFRESH = 120.0     # channel bindings (and their permissions) last 600/300 s


def random_credential(n: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(n))


SYS_NET = "/sys/class/net"


def is_tunnel_device(name: str, sys_net: str = SYS_NET) -> bool:
    """A TUN/TAP device (OpenVPN, n2n, tinc, nebula, wireguard-go, ...) or a kernel WireGuard
    interface, whatever its name: another VPN's inside. A pair through it would carry our
    link inside that VPN (and its checks may win: OpenVPN's ``ovpntap`` did in the bench,
    6 s of checks and every frame through OpenVPN)."""
    base = os.path.join(sys_net, name)
    if os.path.exists(os.path.join(base, "tun_flags")):
        return True
    try:
        with open(os.path.join(base, "uevent")) as f:
            return "DEVTYPE=wireguard" in f.read()
    except OSError:
        return False


def _gather_adapters(exclude: tuple[str, ...] | list[str], sys_net: str = SYS_NET) -> list:
    """Interfaces to gather from: not matching a pattern of ``exclude`` (fnmatch), and not
    another VPN's device unless nothing else has an address (a host whose only uplink is a
    TAP, e.g. an OVS userspace-datapath bridge, still gathers)."""
    named = [ad for ad in ifaddr.get_adapters() if not any(fnmatch.fnmatch(ad.nice_name, p) for p in exclude)]
    plain = [ad for ad in named if not is_tunnel_device(ad.nice_name, sys_net)]
    has_addr = any(isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback
                   for ad in plain for ip in ad.ips)
    return plain if has_addr else named


def host_addresses(exclude: tuple[str, ...] | list[str], use_ipv6: bool, sys_net: str = SYS_NET) -> list[str]:
    """Addresses of the interfaces ``_gather_adapters`` keeps; with ``use_ipv6`` also their
    global and ULA IPv6 addresses. Link-local ones never: a candidate of one would need the
    interface's scope, which means nothing on the peer's host."""
    out = []
    for ad in _gather_adapters(exclude, sys_net):
        for ip in ad.ips:
            if isinstance(ip.ip, str):
                if not ipaddress.ip_address(ip.ip).is_loopback:
                    out.append(ip.ip)
            elif use_ipv6 and ip.ip[2] == 0:
                a = ipaddress.ip_address(ip.ip[0])
                if not (a.is_loopback or a.is_link_local or a.is_multicast or a.ipv4_mapped):
                    out.append(ip.ip[0])
    return out


def local_networks(exclude: tuple[str, ...] | list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks (address/prefix) of the interfaces ``host_addresses`` gathers from: a
    peer's host candidate inside one of them is probably on our LAN."""
    out = []
    for ad in _gather_adapters(exclude):
        for ip in ad.ips:
            addr = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                out.append(ipaddress.ip_network(f"{addr}/{ip.network_prefix}", strict=False))
            except ValueError:
                continue
    return out


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address (None for none, or for a name): candidates may spell one differently."""
    try:
        return ipaddress.ip_address(text) if text else None
    except ValueError:
        return None


def unreachable_from_relay(remote: list[Candidate]) -> set[str]:
    """The peer's host addresses that sit behind a NAT, as its own candidates show: the base
    of a srflx candidate whose address differs from it, and, when the TURN server saw the
    peer from an address that is none of its host addresses (its relay candidate's related
    address: the peer is NATed even if it has no srflx, e.g. UDP blocked and TURN over TCP),
    every host address of that family no server saw it from. Our relay is not paired with
    them: the TURN server cannot reach them, and coturn drops an allocation whose send
    fails (ENETUNREACH closes its relay socket), which left two UDP-blocked peers with no
    relay<->relay path."""
    out = {c.related_address for c in remote
           if c.type == "srflx" and c.related_address and c.related_address != c.host}
    hosts = {c.host: a for c in remote if c.type == "host" and (a := _ip(c.host)) is not None}
    seen = {_ip(c.host) for c in remote if c.type == "srflx"}
    seen |= {_ip(c.related_address) for c in remote if c.type == "relay"}
    for c in remote:
        mapped = _ip(c.related_address) if c.type == "relay" else None
        if mapped is None or mapped.is_unspecified or mapped in hosts.values():
            continue                    # not NATed, or hidden (aioice's relay-only policy)
        out |= {h for h, a in hosts.items() if a.version == mapped.version and a not in seen}
    return out


_S = aioice_ice.CandidatePair.State
_PENDING = (_S.FROZEN, _S.WAITING, _S.IN_PROGRESS)


class Connection(aioice.Connection):
    """aioice Connection with our gathering filter, relay-last checks, host pairs first on a
    shared LAN, and no data queue."""

    server_timeout = 3       # STUN/TURN answers during gathering (aioice's default is 5 s)
    prefer_host_wait = 0.6   # a nominated non-host pair waits this long for a LAN host pair

    def __init__(self, *, exclude: list[str], relay_delay: float, on_stray: Callable[[], None], **kw) -> None:
        super().__init__(**kw)
        self._exclude = tuple(exclude)
        self._relay_delay = relay_delay
        self._on_stray = on_stray
        self._lan_nets: list = []
        self._held: list = []                   # nominated pairs waiting for a LAN host pair
        self._held_timer: asyncio.TimerHandle | None = None

    # -- host pairs first (issue 19 item 1) --------------------------------------------
    # aioice nominates aggressively: the first pair to succeed wins. Between two hosts on one
    # LAN the host pair is checked first and normally wins, but a lost first request, or a
    # peer that answers the router's hairpinned srflx check first, let the pair through the
    # router win for the link's whole life. So a nominated pair that is not host to host is
    # held (at most ``prefer_host_wait``) while a host pair to an address on one of our own
    # networks is still pending; it wins if that pair fails or the time runs out.
    def _lan_host_pair(self, p) -> bool:
        if p.local_candidate.type != "host" or p.remote_candidate.type != "host":
            return False
        try:
            a = ipaddress.ip_address(p.remote_candidate.host)
        except ValueError:
            return False
        return any(a in n for n in self._lan_nets)

    def _better_pending(self, component: int) -> bool:
        return any(p.component == component and p.state in _PENDING and self._lan_host_pair(p)
                   for p in self._check_list)

    def check_complete(self, pair) -> None:  # type: ignore[override]
        if self._check_list_done or self.prefer_host_wait <= 0:
            super().check_complete(pair)
            return
        if (pair.state == _S.SUCCEEDED and pair.nominated and not self._lan_host_pair(pair)
                and self._better_pending(pair.component)):
            pair.nominated = False              # an un-nominated success: the checks go on
            if pair not in self._held:
                self._held.append(pair)
            if self._held_timer is None:
                self._held_timer = asyncio.get_running_loop().call_later(self.prefer_host_wait, self._release)
            super().check_complete(pair)
            return
        if self._held and not (pair.state == _S.SUCCEEDED and pair.nominated):
            pair.task = None
            if not self._better_pending(pair.component):
                self._release()                 # the LAN pair failed: the held one wins now
            return                              # (aioice would call the check list failed)
        super().check_complete(pair)

    def _release(self) -> None:
        """Nominate the best held pair (time is up, or no LAN host pair is left)."""
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        held, self._held = self._held, []
        if self._check_list_done or not held:
            return
        best = max(held, key=lambda p: aioice_ice.candidate_pair_priority(
            p.local_candidate, p.remote_candidate, self.ice_controlling))
        best.nominated = True
        super().check_complete(best)

    async def gather_candidates(self) -> None:
        if self._local_candidates_start:
            return
        self._local_candidates_start = True
        addresses = host_addresses(self._exclude, self._use_ipv6)
        self._lan_nets = local_networks(self._exclude)
        for cands in await asyncio.gather(*[
                self.get_component_candidates(component=c, addresses=addresses, timeout=self.server_timeout)
                for c in self._components]):
            self._local_candidates += cands
        self._local_candidates_end = True

    async def check_start(self, pair) -> None:  # type: ignore[override]
        if (self.ice_controlling and self._relay_delay > 0
                and "relay" in (pair.local_candidate.type, pair.remote_candidate.type)
                and pair.state != aioice_ice.CandidatePair.State.IN_PROGRESS):
            # Mark it in progress so the pacer moves on to other pairs meanwhile.
            self.check_state(pair, aioice_ice.CandidatePair.State.IN_PROGRESS)
            await asyncio.sleep(self._relay_delay)
        await super().check_start(pair)

    def data_received(self, data: bytes, component: int) -> None:
        self._on_stray()

    # Host addresses of a NATed peer (``unreachable_from_relay``) are not reachable from the
    # TURN server. Pairing them with our relay makes coturn send to an unroutable address,
    # and coturn then drops the whole allocation (docs/nat.md, "UDP-blocked pair").
    unreachable_from_relay: set[str] = set()

    def _pair_remote_candidate(self, remote_candidate: Candidate) -> None:
        if remote_candidate.type == "host" and remote_candidate.host in self.unreachable_from_relay:
            saved = self._protocols
            self._protocols = [p for p in saved if p.local_candidate.type != "relay"]
            try:
                super()._pair_remote_candidate(remote_candidate)
            finally:
                self._protocols = saved
            return
        super()._pair_remote_candidate(remote_candidate)


@dataclass
class Path:
    """The selected pair as the datapath uses it."""
    send: Callable[[bytes], None]
    kind: str                      # "direct" | "relay"
    local: str                     # "type host:port"
    remote: str
    protocol: object
    remote_addr: tuple[str, int]
    turn_inner: object | None = None
    channel: int | None = None

    def describe(self) -> dict:
        return {"path": self.kind, "local": self.local, "remote": self.remote, "family": self.family}

    @property
    def family(self) -> str:
        """The underlay's family where our datagrams leave: "ipv6" or "ipv4". Through our own
        TURN allocation that is the way to the TURN server (the relayed address may differ)."""
        addr = self.remote_addr[0]
        inner = _turn_inner(self.protocol) if getattr(self.protocol, "local_candidate", None) is not None \
            and self.protocol.local_candidate.type == "relay" else None   # type: ignore[attr-defined]
        server = getattr(inner, "server", None)     # aioice's TURN client: (host, port) of its server
        if isinstance(server, tuple) and server:
            addr = server[0]
        return "ipv6" if ":" in str(addr) else "ipv4"

    def candidates(self) -> str:
        """The pair's candidate types, as ``status`` shows them: "host->srflx"."""
        return f"{self.local.split()[0]}->{self.remote.split()[0]}"

    def dup_socket(self) -> socket.socket | None:
        """A non-blocking dup of the UDP socket this path's datagrams leave by (for GSO sends
        beside the event loop's transport): the host socket of a direct path or of one to
        the peer's relay, or the socket of our own TURN allocation (connected to the TURN
        server; the datapath frames ChannelData on it itself, see ``channel``). None for a
        TURN allocation over TCP, one without a bound channel, or no socket."""
        if self.turn_inner is not None:
            if self.channel is None:
                return None
            sock = _dup_udp(getattr(self.turn_inner, "transport", None))
        else:
            sock = _dup_udp(self.protocol.transport)  # type: ignore[attr-defined]
        if sock is not None:
            sock.setblocking(False)
        return sock

    def enable_gro(self) -> bool:
        """UDP GRO on this path's socket (see ``enable_gro``)."""
        return enable_gro(self.protocol)

    async def refresh_channel(self) -> None:
        """Bind the TURN channel again (our sends bypass aioice's, which would refresh it)."""
        await self.turn_inner.channel_bind(self.channel, self.remote_addr)  # type: ignore[union-attr]


def _turn_inner(protocol) -> object | None:
    tr = getattr(protocol, "transport", None)
    return getattr(tr, "_TurnTransport__inner_protocol", None) if tr is not None else None


def make_path(protocol, remote: Candidate, remote_addr: tuple[str, int]) -> Path:
    """A send function for a pair: straight sendto on a direct socket, or a TURN
    ChannelData frame written on the TURN client's own transport (no task per packet)."""
    local: Candidate = protocol.local_candidate
    relay = local.type == "relay" or remote.type == "relay"
    desc_l = f"{local.type} {local.host}:{local.port}"
    desc_r = f"{remote.type} {remote_addr[0]}:{remote_addr[1]}"
    inner = _turn_inner(protocol) if local.type == "relay" else None
    if inner is not None:
        channel = inner.peer_to_channel.get(remote_addr)
        if channel is not None:
            pack = struct.Struct("!HH").pack
            raw = inner._send          # pads for TCP; plain datagram for UDP

            def send(data: bytes) -> None:
                raw(pack(channel, len(data)) + data)
            return Path(send, "relay", desc_l, desc_r, protocol, remote_addr, inner, channel)
        sendto_t = protocol.transport.sendto
        return Path(lambda d: sendto_t(d, remote_addr), "relay", desc_l, desc_r, protocol, remote_addr)
    sendto = protocol.transport.sendto
    return Path(lambda d: sendto(d, remote_addr), "relay" if relay else "direct", desc_l, desc_r,
                protocol, remote_addr)


# What the hook hands our packets to: (buffer, segment size, sender, protocol, where the
# pieces of a GRO buffer that are not data packets go) -- receive.Receiver.receive.
OnOurs = Callable[[bytes, int, tuple, object, "Callable[[bytes, tuple], None] | None"], None]
_LO, _HI = codec.TYPE_INIT, codec.TYPE_DATA
_DATA, _DATA_MIN = codec.TYPE_DATA, codec.DATA_MIN_LEN
_CHAN = struct.Struct("!HH")            # TURN ChannelData header: channel number, length
_PROBE = 0xE8                           # predict.PROBE: port prediction's messages
BATCH_BYTES = 65536
# The C reader (accel; _recvmany.h): recvmmsg, and _Batch's gluing without a Python call per
# datagram. None: the hook reads and glues in Python, one recvmsg per datagram.
_recv_many = accel.fastpath.recv_many if accel.fastpath is not None else None


class _Batch:
    """Single data packets of one wake-up's reads from one sender, laid back to back as one
    burst, as UDP GRO would have glued them (equal sizes, the last may be shorter): the
    receiver then runs its per-burst loop (and the C loop) once for all of them instead of
    once per datagram. Where GRO does not glue (a relay's datagrams, sent one by one; a
    veth without GRO) this is what keeps a relayed path batched. Delivered at the end of
    the wake-up's reads (``flush``), before anything else from the socket, so nothing is
    delayed or reordered."""

    __slots__ = ("buf", "off", "seg", "addr", "deliver")

    def __init__(self, deliver: Callable[[bytes, int, tuple], None]) -> None:
        self.buf = bytearray(BATCH_BYTES)
        self.off = self.seg = 0
        self.addr: tuple | None = None
        self.deliver = deliver

    def add(self, data, o: int, e: int, addr: tuple) -> None:
        n = e - o
        if self.off and (n > self.seg or addr != self.addr or self.off + n > BATCH_BYTES):
            self.flush()
        if not self.off:
            self.seg, self.addr = n, addr
        self.buf[self.off:self.off + n] = memoryview(data)[o:e]
        self.off += n
        if n < self.seg:            # a shorter one ends the burst, as in GRO
            self.flush()

    def flush(self) -> None:
        if self.off:
            data, self.off = bytes(self.buf[:self.off]), 0
            self.deliver(data, self.seg, self.addr)   # type: ignore[arg-type]


class _Hook:
    """The one wrapper around a socket's ``datagram_received``: our packets (first byte
    0xE1..0xE3) go to ``on_ours`` before aioice parses them, everything else to aioice.

    On a host socket the hook also reads the socket (``take_over``): with UDP GRO on
    (``enable_gro``) the peer's GSO sends arrive glued in one buffer, and only
    ``recvmsg`` tells where they were cut (the UDP_GRO control message: gso_size). A
    size guessed from the data let one spoofed datagram in front of a burst (or a
    rekey) fail the whole burst (security review, finding 7). Pieces of a buffer that
    are not data packets go back through ``route`` (ours to us, STUN to aioice)."""

    __slots__ = ("protocol", "orig", "on_ours", "gro", "batch", "side")

    def __init__(self, protocol, on_ours: OnOurs) -> None:
        self.protocol = protocol
        self.orig = protocol.datagram_received
        self.on_ours = on_ours
        self.gro = False
        self.side: Callable[[object, bytes, tuple], None] | None = None   # port prediction's messages
        self.batch = _Batch(self._burst)
        protocol.datagram_received = self.received
        protocol._ipsw_hook = self

    def _burst(self, data: bytes, seg: int, addr: tuple) -> None:
        self.on_ours(data, seg, addr, self.protocol, None)

    def received(self, data: bytes, addr: tuple) -> None:
        """One datagram (also a piece of a GRO buffer that is not a data packet)."""
        if not data or not _LO <= data[0] <= _HI:
            if data and data[0] == _PROBE and self.side is not None:
                self.side(self.protocol, data, addr)
                return
            self.orig(data, addr)
            return
        self.on_ours(data, len(data), addr, self.protocol, None)

    def received_buffer(self, data: bytes, seg: int, addr: tuple) -> None:
        """What one receive on a taken-over socket returned: datagrams of ``seg`` bytes but
        the last (the kernel's gso_size), or one datagram (``seg == len(data)``)."""
        if seg < len(data):
            self.batch.flush()
            self.on_ours(data, seg, addr, self.protocol, self.received)  # data packets skip the hooks
        elif len(data) >= _DATA_MIN and data[0] == _DATA:
            self.batch.add(data, 0, len(data), addr)     # delivered with the wake-up's others
        else:
            self.batch.flush()
            self.received(data, addr)

    def read_host(self, tr: batch_io.GroTransport) -> None:
        """A wake-up's reads on a taken-over host socket, with the C ``recv_many``: single
        data packets of one sender come glued as one burst (what ``batch`` does datagram
        by datagram in Python), everything else as ``received_buffer`` takes it."""
        on, other, protocol = self.on_ours, self.received_buffer, self.protocol
        for kind, data, seg, addr in _recv_many(tr.fileno()):
            if kind:
                other(data, seg, addr)
            else:
                on(data, seg, addr, protocol, None)
            if tr.is_closing():
                return

    def read_turn(self, tr: batch_io.GroTransport) -> None:
        """A wake-up's reads on our TURN allocation's socket, with the C ``recv_many``
        (``turn_received``'s rules): ChannelData of a bound channel unwrapped (data packets
        glued per peer, anything else of the peer's to ``received``), the server's own
        messages to aioice's TURN client."""
        inner = _turn_inner(self.protocol)
        on, protocol = self.on_ours, self.protocol
        for kind, data, seg, addr in _recv_many(tr.fileno(), inner.channel_to_peer if inner is not None else {}):
            if not kind:
                on(data, seg, addr, protocol, None)
            elif kind == 1:
                self.received(data, addr)
            elif inner is not None:             # (read and dropped without a client: no busy loop)
                inner.datagram_received(data, addr)
            if tr.is_closing():
                return

    def turn_received(self, data: bytes, seg: int, addr: tuple) -> None:
        """What one receive on our TURN allocation's socket returned (read by us, see
        ``take_over``): ChannelData from the peer through the server (data packets batched,
        anything else of the peer's to ``received`` as aioice would hand it over) and the
        server's own STUN messages (responses, Data indications) to aioice's TURN client."""
        inner = _turn_inner(self.protocol)
        n = len(data)
        o = 0
        while o < n:
            e = o + seg if o + seg < n else n
            if 0x40 <= data[o] <= 0x7F and e - o >= 4:
                channel, length = _CHAN.unpack_from(data, o)
                peer = inner.channel_to_peer.get(channel) if inner is not None else None
                p = o + 4
                if peer is not None and length <= e - p:     # else dropped, as aioice does
                    if length >= _DATA_MIN and data[p] == _DATA:
                        self.batch.add(data, p, p + length, peer)
                    else:
                        self.batch.flush()
                        self.received(data[p:p + length], peer)
            else:
                self.batch.flush()
                if inner is not None:
                    inner.datagram_received(data if e - o == n else data[o:e], addr)
            o = e

    def take_over(self) -> bool:
        """Read this socket ourselves: the event loop's transport gives up the socket
        (closed on a dup, its close not reported to aioice), a ``GroTransport`` on the dup
        reads and sends from now on. For a TURN allocation over UDP that is the TURN
        client's socket (aioice's client keeps sending on it and gets the server's STUN
        messages from ``turn_received``), with UDP GRO on at once, since every piece is
        parsed on its own. False (nothing changed) for TURN over TCP or a transport without
        a UDP socket."""
        protocol = self.protocol
        inner = _turn_inner(protocol)
        owner = inner if inner is not None else protocol
        tr = getattr(owner, "transport", None)
        if isinstance(tr, batch_io.GroTransport):
            return True
        sock = _dup_udp(tr)
        if sock is None:
            return False
        loop = asyncio.get_running_loop()
        tr.set_protocol(asyncio.DatagramProtocol())
        tr.close()
        if inner is not None:
            try:
                sock.setsockopt(batch_io.SOL_UDP, batch_io.UDP_GRO, 1)
            except OSError:
                pass
            inner.transport = batch_io.GroTransport(loop, sock, inner, self.turn_received, self.batch.flush,
                                                    self.read_turn if _recv_many else None)
        else:
            protocol.transport = batch_io.GroTransport(loop, sock, protocol, self.received_buffer,
                                                       self.batch.flush, self.read_host if _recv_many else None)
        return True


def _dup_udp(transport) -> socket.socket | None:
    """A dup of the UDP socket behind ``transport``, or None (no socket, or not UDP)."""
    try:
        raw = transport.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(raw.fileno()))
    except (AttributeError, OSError, ValueError):
        return None
    if sock.type != socket.SOCK_DGRAM:
        sock.close()
        return None
    return sock


def same_addr(a: tuple, b: tuple) -> bool:
    """Two socket addresses name the same host and port (an IPv6 four-tuple against a pair,
    a candidate's spelling of an address against the kernel's)."""
    if a[1] != b[1]:
        return False
    if a[0] == b[0]:
        return True
    try:
        return ipaddress.ip_address(a[0]) == ipaddress.ip_address(b[0])
    except ValueError:
        return False


def reply(protocol, data: bytes, addr: tuple) -> None:
    """Send ``data`` back to ``addr`` on the socket (or TURN allocation) behind ``protocol``,
    the one a datagram from ``addr`` came in on."""
    protocol.transport.sendto(data, addr)


def install_hook(protocol, on_ours: OnOurs) -> None:
    """Take our packets off ``protocol`` (an aioice socket's) before aioice parses them;
    a host socket is from now on read by the hook's own transport (``_Hook.take_over``)."""
    _Hook(protocol, on_ours).take_over()


def set_side_handler(protocol, fn: Callable[[object, bytes, tuple], None] | None) -> bool:
    """Hand port prediction's messages (first byte 0xE8) arriving on a hooked socket to
    ``fn(protocol, data, addr)`` (None: to aioice again, which counts them as stray)."""
    hook = getattr(protocol, "_ipsw_hook", None)
    if hook is None:
        return False
    hook.side = fn
    return True


def predicted_path(protocol, remote_addr: tuple[str, int]) -> Path:
    """A direct path found by port prediction, on ``protocol``'s socket (the hard side's
    winning socket, or the easy side's ICE host socket). Its candidates read
    "host->prediction" in ``status``."""
    sock = protocol.transport.get_extra_info("sockname") or ("?", 0)
    sendto = protocol.transport.sendto
    local = f"host {sock[0]}:{sock[1]}"
    remote = f"prediction {remote_addr[0]}:{remote_addr[1]}"
    return Path(lambda d: sendto(d, remote_addr), "direct", local, remote, protocol, tuple(remote_addr))


def enable_gro(protocol) -> bool:
    """UDP GRO on the socket behind ``protocol`` (hooked by ``install_hook``): its hook then
    splits glued bursts at the kernel's segment size. Only on a socket the hook reads
    itself: anywhere else nobody could tell where glued datagrams were cut. True if it is
    on (now or already)."""
    hook = getattr(protocol, "_ipsw_hook", None)
    if hook is None or not isinstance(protocol.transport, batch_io.GroTransport):
        return False
    if hook.gro:
        return True
    try:
        protocol.transport.get_extra_info("socket").setsockopt(batch_io.SOL_UDP, batch_io.UDP_GRO, 1)
    except OSError:
        return False
    hook.gro = True
    return True


@dataclass
class IceConfig:
    stun: tuple[str, int] | None
    turn: tuple[str, int] | None
    turn_user: str | None
    turn_password: str | None
    turn_transport: str
    exclude: list[str]
    use_ipv6: bool = True         # IPv6 host candidates where the host has global or ULA addresses
    relay_delay: float = 1.0
    direct_only: bool = False     # an upgrade probe gathers no relay


class IceSession:
    """One ICE attempt: gather -> (exchange credentials/candidates) -> connect -> selected pair."""

    def __init__(self, cfg: IceConfig, controlling: bool, attempt: int, on_ours, on_stray) -> None:
        self.attempt = attempt
        self.controlling = controlling
        self.ufrag = random_credential(8)
        self.pwd = random_credential(24)
        self.remote_ufrag = ""
        self._on_ours = on_ours
        self.conn = Connection(
            exclude=list(DEFAULT_EXCLUDE) + list(cfg.exclude), relay_delay=cfg.relay_delay, on_stray=on_stray,
            ice_controlling=controlling, stun_server=cfg.stun,
            turn_server=None if cfg.direct_only else cfg.turn,
            turn_username=cfg.turn_user, turn_password=cfg.turn_password, turn_transport=cfg.turn_transport,
            use_ipv6=cfg.use_ipv6, local_username=self.ufrag, local_password=self.pwd)
        self.closed = False

    async def gather(self) -> dict:
        await self.conn.gather_candidates()
        for p in self.conn._protocols:
            install_hook(p, self._on_ours)
        if not self.conn.local_candidates:
            raise ConnectionError("no local candidates (all interfaces excluded?)")
        return {"ufrag": self.ufrag, "pwd": self.pwd,
                "candidates": [c.to_sdp() for c in self.conn.local_candidates]}

    async def set_remote(self, ufrag: str, pwd: str, candidates: list[str]) -> int:
        """Add the peer's credentials and candidates; returns how many were usable."""
        if not isinstance(ufrag, str) or not isinstance(pwd, str) or not isinstance(candidates, list):
            raise ValueError("bad remote credentials")
        self.conn.remote_username = ufrag
        self.conn.remote_password = pwd
        self.remote_ufrag = ufrag
        parsed = []
        for sdp in candidates[:64]:
            try:
                parsed.append(Candidate.from_sdp(sdp))
            except (ValueError, IndexError, TypeError):
                continue
        self.conn.unreachable_from_relay = unreachable_from_relay(parsed)
        n = 0
        for c in parsed:
            await self.conn.add_remote_candidate(c)
            n += 1
        await self.conn.add_remote_candidate(None)
        return n

    async def connect(self) -> Path:
        await self.conn.connect()
        pair = self.conn._nominated.get(1)
        if pair is None:
            raise ConnectionError("ICE completed without a nominated pair")
        return make_path(pair.protocol, pair.remote_candidate, pair.remote_addr)

    def stop_consent(self) -> None:
        """End aioice's RFC 7675 consent checks (a STUN request each ~5 s, both ways, on every
        link): the link's authenticated pings and dead-path detection do that job, and an idle
        link must not pay for it (docs/tunnel.md, "Keepalives")."""
        task = self.conn._query_consent_task
        if task is not None and not task.done():
            task.cancel()
        self.conn._query_consent_task = None

    def candidates(self) -> tuple[list[Candidate], list[Candidate]]:
        """(ours, the peer's) as exchanged: port prediction plans from them."""
        return list(self.conn.local_candidates), list(self.conn.remote_candidates)

    @property
    def remote_pwd(self) -> str:
        return self.conn.remote_password or ""

    def protocol_at(self, host: str, port: int):
        """The (hooked) host socket bound to ``host:port``, or None."""
        for p in self.conn._protocols:
            c = p.local_candidate
            if c is not None and c.type == "host" and c.port == port and same_addr((c.host, c.port), (host, port)):
                return p
        return None

    def local_addresses(self) -> set[str]:
        return {c.host for c in self.conn.local_candidates if c.type == "host"}

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        turns = [(p.transport, i) for p in list(self.conn._protocols) if (i := _turn_inner(p)) is not None]
        try:
            await asyncio.wait_for(self.conn.close(), 3.0)
        except (asyncio.TimeoutError, Exception) as e:   # closing must never wedge the worker
            log.debug("ICE close: %s", e)
        for tr, inner in turns:
            _drop_allocation(tr, inner)


def _drop_allocation(tr, inner) -> None:
    """Give up a TURN allocation whose deletion did not finish in time (our address is gone
    after a roam, or the server is dead): aioice would retransmit the deletion for ~64 s
    and keep the socket that long. The server frees the allocation when it expires."""
    task = getattr(tr, "_TurnTransport__close_task", None)
    if task is not None and not task.done():
        task.cancel()                       # aioice's delete() closes the socket when cancelled
    refresh = getattr(inner, "refresh_task", None)
    if refresh is not None and not refresh.done():
        refresh.cancel()
    sock_tr = getattr(inner, "transport", None)
    if sock_tr is not None and not sock_tr.is_closing():
        sock_tr.close()
