"""A link's TAP device: the peer's port on the node's OVS bridge.

The host stack is kept off it: no addresses, ``arp_ignore=1`` so the kernel never
answers ARP for the bridge's address on the TAP (with OVS's userspace datapath every
system port is also a live host interface: the peer would learn the TAP's MAC and
frames would bypass OVS without any sign), IPv6 disabled. The device is not persistent: it disappears when
its file descriptor closes, so the agent must remove the OVS port first.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from ..errors import IpopError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x1, 0x2, 0x4
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
IFF_UP = 0x1


class TapError(IpopError):
    pass


def _sysctl(path: str, value: str) -> None:
    try:
        Path(path).write_text(value)
    except OSError as e:
        raise TapError(f"cannot set {path}: {e}") from None


def _set_mtu_up(name: str, mtu: int) -> None:
    """MTU and IFF_UP with two ioctls (pyroute2's netlink API cannot run inside our event loop)."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFMTU, struct.pack("16si20x", name.encode(), mtu))
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", name.encode(), 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), flags | IFF_UP))


class Tap:
    """Open ``name`` as a TAP (non-blocking fd), set MTU, bring it up without any host stack.

    With ``vnet`` (the default) the TAP is opened with ``IFF_VNET_HDR``: every read and
    write starts with a 10-byte ``virtio_net_hdr``, so the batched datapath can turn TSO
    on per link (``set_offloads``) once the peer accepts offloaded frames. Offloads start
    off (the kernel hands over complete, segmented frames). A kernel that refuses
    IFF_VNET_HDR leaves ``vnet`` False: the per-packet path without headers.
    """

    def __init__(self, name: str, mtu: int, *, vnet: bool = True) -> None:
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
            raise TapError(f"TAP name {name!r}: 1-15 characters, no '/'")
        if not 576 <= mtu <= 65000:
            raise TapError(f"MTU {mtu}: must be 576..65000")
        self.name = name
        self.mtu = mtu
        self.fd = -1
        self.want_vnet = vnet
        self.vnet = False
        self.tso = False

    def open(self) -> "Tap":
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TapError(f"/dev/net/tun: {e}") from None
        flags = IFF_TAP | IFF_NO_PI
        opened = False
        if self.want_vnet:
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", self.name.encode(), flags | IFF_VNET_HDR))
                fcntl.ioctl(fd, TUNSETOFFLOAD, 0)     # complete frames until a peer takes offloads
                opened = self.vnet = True
            except OSError:
                os.close(fd)                          # an old kernel: reopen without headers
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        if not opened:
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", self.name.encode(), flags))
            except OSError as e:
                os.close(fd)
                raise TapError(f"TAP {self.name}: {e} (name in use?)") from None
        self.fd = fd
        try:
            # Before the device is up: no IPv6 link-local address, no ARP answers.
            _sysctl(f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6", "1") if Path(
                f"/proc/sys/net/ipv6/conf/{self.name}").exists() else None
            _sysctl(f"/proc/sys/net/ipv4/conf/{self.name}/arp_ignore", "8")
            _sysctl(f"/proc/sys/net/ipv4/conf/{self.name}/arp_announce", "2")
            _set_mtu_up(self.name, self.mtu)
        except Exception as e:
            self.close()
            raise TapError(f"TAP {self.name}: set-up failed: {e}") from None
        return self

    def set_offloads(self, tso: bool) -> bool:
        """Checksum + TSO offloads on (reads may be 64 KiB TCP super-frames with partial
        checksums) or all off (the kernel completes and segments before we read). Returns
        whether TSO is now on; False when the TAP has no vnet header or the kernel refuses."""
        if not self.vnet or self.fd < 0:
            return False
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 if tso else 0)
        except OSError:
            tso = False
            try:
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, 0)
            except OSError:
                pass
        self.tso = tso
        return tso

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
