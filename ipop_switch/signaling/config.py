"""Settings of one overlay's signaling session (validated; the agent's TOML embeds them)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
from msgspec import field

from .. import hostport

_RESOURCE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"

_POSITIVE = ("connect_timeout", "backoff_min", "backoff_max", "keepalive", "queue_timeout", "replay_window",
             "max_future_skew", "leave_grace", "rejoin_grace", "recheck_interval")


class SignalingConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Built by the agent from the validated node config and by the harness from its command
    line: ``__post_init__`` checks every value either could get wrong."""

    jid: str                    # XMPP account of this node for this overlay, user@domain
    password: str               # kept out of repr
    server: str | None = None   # host to connect to (default: the JID's domain)
    port: int = 5222
    # several servers of one cluster, 'host' or 'host:port' (port default ``port``), tried in
    # order: the session stays on one and moves to the next when it is lost or unreachable
    # (``server`` is then unused)
    servers: list[str] = field(default_factory=list)
    ca_file: Path | None = None     # CA that must have signed the server certificate (default: the system's)
    room: str | None = None         # MUC room name (default ipsw-<overlay>)
    muc_domain: str | None = None   # MUC service (default conference.<JID domain>)
    capabilities: dict[str, Any] = field(default_factory=dict)    # announced to peers as is
    # XMPP resource to bind (SocialVPN: the node's name; default: the server picks one)
    resource: str | None = None
    # send presence at login (SocialVPN's discovery sends its own, once its handlers see the answers)
    initial_presence: bool = True

    connect_timeout: float = 10.0   # TCP + TLS + login + room join, seconds
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    keepalive: float = 30.0         # XMPP ping interval; a missed ping drops the session
    queue_timeout: float = 30.0     # how long a message waits for an unreachable peer
    queue_max: int = 1024
    replay_window: float = 60.0     # how old a message may be (clock difference plus delivery time)
    max_future_skew: float = 5.0    # how far ahead of our clock a message may be dated (keep NTP)
    # a peer that left the room is reported gone after this unless it comes back (or we lose the server too)
    leave_grace: float = 5.0
    rejoin_grace: float = 20.0      # after a reconnect, peers not seen again within this are reported as left
    recheck_interval: float = 30.0  # re-verify known peers' certificates this often
    # how often to compare the room's occupants as the server lists them with the presences we
    # got (a split room: two rooms of one name on two cluster nodes, or a room lost with the
    # cluster node that held it); 0 = never
    room_check: float = 10.0

    def __post_init__(self) -> None:
        local, _, domain = self.jid.partition("@")
        if not local or not domain or "/" in domain:
            raise ValueError(f"jid {self.jid!r} must be user@domain (no resource)")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port}: 1-65535")
        for s in self.servers:
            hostport.split(s, 5222)
        if self.resource is not None and not re.match(_RESOURCE, self.resource):
            raise ValueError(f"resource {self.resource!r}: a DNS label (a-z, 0-9, '-')")
        for name in _POSITIVE:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.room_check < 0 or self.queue_max < 1:
            raise ValueError("room_check must be >= 0 and queue_max >= 1")

    def __repr__(self) -> str:
        return f"SignalingConfig(jid={self.jid!r}, endpoints={self.endpoints()!r})"

    def endpoints(self) -> list[tuple[str, int]]:
        """The servers to try, in order: ``servers``, else ``server`` (or the JID's domain)."""
        return [hostport.split(s, self.port) for s in self.servers] or [(self.server or self.domain, self.port)]

    @property
    def domain(self) -> str:
        return self.jid.partition("@")[2]

    def room_jid(self, overlay: str) -> str:
        return f"{(self.room or f'ipsw-{overlay}').lower()}@{self.muc_domain or 'conference.' + self.domain}"
