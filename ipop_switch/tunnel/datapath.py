"""The per-frame path of one link: a ``Sender`` (send.py: TAP -> AEAD -> UDP) and a
``Receiver`` (receive.py: UDP -> AEAD -> TAP) over one ``SessionTable`` (session.py).

Two modes, chosen per link attempt from what both ends support (docs/tunnel.md, "Data
packets" and "Offload negotiation"):

- **batched** (both ends announced ``offload: 1``): the TAP runs with TSO, so a read is
  often a 64 KiB TCP super-frame, cut into MSS segments each sealed as its own data
  packet and sent with UDP GSO; the receiver writes runs of contiguous segments as one
  GSO frame. Frames that are not TCP pass one by one, in order.
- **per packet** (the peer is older, the bridge has no TSO, the kernel has no vnet
  header): the TAP hands over complete, segmented frames and each is sealed alone.

The per-segment loops of the batched mode run in C when the extension is built
(``accel``, ``_fastpath.c``: same wire bytes, same TAP writes, tested one against the
other); everything else, and both loops when it is not built, is Python. Everything
runs in the pool process's event loop (uvloop): the link registers ``tap_readable``
with ``add_reader``; datagrams arrive through ice.py's socket hook into ``receive``.
"""

from __future__ import annotations

from typing import Callable

from .receive import OnControl, OnHandshake, Receiver
from .send import SendFn, Sender
from .session import Session, SessionTable
from .stats import Stats


class Datapath:
    """Frames of one link. The link sets the sessions (``table``), the path (``use_path``,
    or ``send`` for a bare send function) and the peer's hints (``set_peer_hints``).

    ``tap`` (a ``tap.Tap``) gives the vnet header and offload switch; ``bridge_tso`` says
    whether the bridge behind the TAP takes GSO frames and partial checksums (with
    OVS's userspace datapath only with ``userspace-tso-enable``): only then do we
    accept offloaded frames from the peer, and coalesce. ``offload=False`` forces the
    per-packet path."""

    def __init__(self, tap_fd: int, stats: Stats, on_control: OnControl, on_handshake: OnHandshake,
                 *, tap=None, bridge_tso: bool = True, offload: bool = True) -> None:
        vnet = bool(tap is not None and tap.vnet)
        self.stats = stats
        self.table = SessionTable()
        self.tx = Sender(tap_fd, stats, self.table, tap=tap, allow_offload=offload)
        self.rx = Receiver(tap_fd, stats, self.table, on_control, on_handshake,
                           vnet=vnet, accept_offload=vnet and bridge_tso and offload)
        self.tap_readable = self.tx.tap_readable
        self.send_control = self.tx.send_control
        self.receive = self.rx.receive
        self.datagram = self.rx.datagram
        self.local_hints = self.rx.local_hints

    def set_peer_hints(self, hints) -> None:
        """The peer's hints for this attempt (see ``Sender.set_peer_hints``)."""
        self.tx.set_peer_hints(hints)
        self.stats.mode = ("batched" if self.tx.tx_offload else "per-packet") + \
            ("/coalescing" if self.rx.rx_offload else "")

    def use_path(self, path) -> None:
        """Send on ``path`` (ice.Path); on a direct path with UDP GSO sends, also receive
        with UDP GRO."""
        if self.tx.use_path(path):
            path.enable_gro()

    @property
    def send(self) -> SendFn | None:
        return self.tx.send

    @send.setter
    def send(self, fn: SendFn | None) -> None:
        self.tx.send = fn

    @property
    def current(self) -> Session | None:
        return self.table.current

    def set_on_confirm(self, fn: Callable[[Session], None]) -> None:
        self.rx.on_confirm = fn

    def detach(self) -> None:
        """The attempt is over: no path, no sessions."""
        self.tx.send = None
        self.table.clear()
