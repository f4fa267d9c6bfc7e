"""A link's TAP device: the peer's port on the node's OVS bridge.

The host stack is kept off it (datapath-facts.md): no addresses, ``arp_ignore=1``
so the kernel never answers ARP for the bridge's address on the TAP (frames would
then bypass OVS), IPv6 disabled. The device is not persistent: it disappears when
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
IFNAMSIZ = 16
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
    """Open ``name`` as a TAP (non-blocking fd), set MTU, bring it up without any host stack."""

    def __init__(self, name: str, mtu: int) -> None:
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
            raise TapError(f"TAP name {name!r}: 1-15 characters, no '/'")
        if not 576 <= mtu <= 65000:
            raise TapError(f"MTU {mtu}: must be 576..65000")
        self.name = name
        self.mtu = mtu
        self.fd = -1

    def open(self) -> "Tap":
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TapError(f"/dev/net/tun: {e}") from None
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", self.name.encode(), IFF_TAP | IFF_NO_PI))
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

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
