"""Addresses in settings: 'host', 'host:port', '[v6]:port' or a bare IPv6 literal.

One parser for the node config (XMPP servers, STUN/TURN, DNS forwarders, the web view) and
the signaling settings, so that every setting takes the same forms and refuses the same
mistakes with the same words.
"""

from __future__ import annotations

import ipaddress


def split(v: str, default_port: int, *, ip: bool = False) -> tuple[str, int]:
    """``v`` -> (host, port); the port is ``default_port`` when ``v`` gives none (a bare IPv6
    literal never does: its last group is not a port). ValueError naming the text when the
    host is empty, the port is not 1-65535, a bracket is unclosed or followed by anything but
    ':port', or (``ip``) the host is not an IP literal."""
    if v.startswith("["):
        host, sep, rest = v[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {v!r} (use [v6]:port)")
        port = rest[1:] if rest else str(default_port)
    elif v.count(":") > 1:
        host, port = v, str(default_port)
    else:
        host, sep, port = v.rpartition(":")
        if not sep:
            host, port = v, str(default_port)
    if not host:
        raise ValueError(f"bad address {v!r}: no host")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {v!r} (1-65535)")
    if ip:
        ipaddress.ip_address(host)      # raises ValueError naming the text
    return host, int(port)
