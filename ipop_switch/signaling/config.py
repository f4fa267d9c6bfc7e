"""Settings of one overlay's signaling session (validated; the agent's TOML embeds them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SignalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jid: str = Field(description="XMPP account of this node for this overlay, user@domain")
    password: str = Field(repr=False)
    server: str | None = Field(None, description="host to connect to (default: the JID's domain)")
    port: int = Field(5222, ge=1, le=65535)
    servers: list[str] = Field(default_factory=list, description="several servers of one cluster, 'host' or "
                               "'host:port' (port default ``port``), tried in order: the session stays on one and "
                               "moves to the next when it is lost or unreachable (``server`` is then unused)")
    ca_file: Path | None = Field(None, description="CA that must have signed the server certificate "
                                                   "(default: the system's CAs)")
    room: str | None = Field(None, description="MUC room name (default ipsw-<overlay>)")
    muc_domain: str | None = Field(None, description="MUC service (default conference.<JID domain>)")
    capabilities: dict[str, Any] = Field(default_factory=dict, description="announced to peers as is")
    resource: str | None = Field(None, pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
                                 description="XMPP resource to bind (SocialVPN: the node's name; default: "
                                             "the server picks one)")
    initial_presence: bool = Field(True, description="send presence at login (SocialVPN's discovery sends its "
                                                     "own, once its handlers see the answers)")

    connect_timeout: float = Field(10.0, gt=0, description="TCP + TLS + login + room join, seconds")
    backoff_min: float = Field(1.0, gt=0)
    backoff_max: float = Field(60.0, gt=0)
    keepalive: float = Field(30.0, gt=0, description="XMPP ping interval; a missed ping drops the session")
    queue_timeout: float = Field(30.0, gt=0, description="how long a message waits for an unreachable peer")
    queue_max: int = Field(1024, ge=1)
    replay_window: float = Field(60.0, gt=0, description="how old a message may be, seconds (clock difference "
                                                         "plus delivery time)")
    max_future_skew: float = Field(5.0, gt=0, description="how far ahead of our clock a message may be dated, "
                                                           "seconds (keep clocks in step with NTP)")
    leave_grace: float = Field(5.0, gt=0, description="a peer that left the room is reported gone after this "
                                                      "unless it comes back (or we lose the server too)")
    rejoin_grace: float = Field(20.0, gt=0, description="after a reconnect, peers not seen again within this "
                                                        "are reported as left")
    recheck_interval: float = Field(30.0, gt=0, description="re-verify known peers' certificates this often")
    room_check: float = Field(10.0, ge=0, description="how often to compare the room's occupants as the server "
                                                       "lists them with the presences we got (a split room: two "
                                                       "rooms of one name on two cluster nodes, or a room lost "
                                                       "with the cluster node that held it); 0 = never")

    @field_validator("jid")
    @classmethod
    def _jid(cls, v: str) -> str:
        local, _, domain = v.partition("@")
        if not local or not domain or "/" in domain:
            raise ValueError("must be user@domain (no resource)")
        return v

    @field_validator("servers")
    @classmethod
    def _servers(cls, v: list[str]) -> list[str]:
        for s in v:
            split_hostport(s, 5222)
        return v

    def endpoints(self) -> list[tuple[str, int]]:
        """The servers to try, in order: ``servers``, else ``server`` (or the JID's domain)."""
        return [split_hostport(s, self.port) for s in self.servers] or [(self.server or self.domain, self.port)]

    @property
    def domain(self) -> str:
        return self.jid.partition("@")[2]

    def room_jid(self, overlay: str) -> str:
        return f"{(self.room or f'ipsw-{overlay}').lower()}@{self.muc_domain or 'conference.' + self.domain}"


def split_hostport(v: str, default_port: int) -> tuple[str, int]:
    """'host', 'host:port', '[v6]:port' or a bare IPv6 literal -> (host, port); ValueError if bad."""
    if v.startswith("["):
        host, sep, rest = v[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"server {v!r}: use [v6]:port")
        port = rest[1:] if rest else str(default_port)
    elif v.count(":") > 1:
        host, port = v, str(default_port)
    else:
        host, sep, port = v.rpartition(":") if ":" in v else (v, "", str(default_port))
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"server {v!r}: use host, host:port or [v6]:port")
    return host, int(port)
