"""The node's TOML config, validated at start: every error names the field.

One file per node; one or more ``[[overlay]]`` tables, each with its own XMPP
account, ICE servers, trust material and bridge.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import IpopError

NAME_RE = r"^[a-z][a-z0-9]{0,9}$"


class ConfigError(IpopError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _hostport(v: str, default_port: int) -> tuple[str, int]:
    host, sep, port = v.rpartition(":")
    if not sep:
        return v, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {v!r}")
    return host, int(port)


class XmppConfig(_Strict):
    server: str = Field(description="XMPP server host or address")
    port: int = Field(5222, ge=1, le=65535)
    jid: str = Field(pattern=r"^[^@/\s]+@[^@/\s]+$", description="this node's account, user@domain")
    password: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = Field(None, description="CA that signed the server certificate (default: system CAs)")
    room: str | None = Field(None, description="GroupVPN: the group's MUC room JID (default: <overlay>@conference.<domain>)")

    @model_validator(mode="after")
    def _one_password(self):
        if (self.password is None) == (self.password_file is None):
            raise ValueError("give exactly one of password and password_file")
        return self

    def secret(self) -> str:
        if self.password is not None:
            return self.password
        try:
            return self.password_file.read_text().strip()  # type: ignore[union-attr]
        except OSError as e:
            raise ConfigError(f"xmpp.password_file: {e}") from None


class IceConfig(_Strict):
    stun: str | None = Field(None, description="host:port of a STUN server")
    turn: str | None = Field(None, description="host:port of a TURN server")
    turn_user: str | None = None
    turn_password: str | None = None
    turn_transport: Literal["udp", "tcp"] = "udp"
    ignore_interfaces: list[str] = Field(default_factory=list, description="interfaces left out of candidate gathering")

    @field_validator("stun", "turn")
    @classmethod
    def _addr(cls, v: str | None) -> str | None:
        if v is not None:
            _hostport(v, 3478)
        return v

    @model_validator(mode="after")
    def _turn_creds(self):
        if self.turn and not (self.turn_user and self.turn_password):
            raise ValueError("turn needs turn_user and turn_password")
        return self

    def stun_addr(self) -> tuple[str, int] | None:
        return _hostport(self.stun, 3478) if self.stun else None

    def turn_addr(self) -> tuple[str, int] | None:
        return _hostport(self.turn, 3478) if self.turn else None


GUEST_NAME_RE = r"^[a-z0-9][a-z0-9_.-]{0,31}$"
MAC_RE = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"


class AttachConfig(_Strict):
    """A guest plugged into the overlay's bridge: a network namespace or container (a veth
    pair, one end inside), or an existing interface (a VM's TAP, a NIC, a veth into a Linux
    bridge) added as it is."""
    name: str = Field(pattern=GUEST_NAME_RE, description="guest name, unique in the overlay")
    netns: str | None = Field(None, description="namespace name (ip netns) or path (/proc/PID/ns/net, /run/netns/x)")
    pid: int | None = Field(None, ge=1, description="a process in the namespace (a container's PID)")
    interface: str | None = Field(None, pattern=r"^[^/\s]{1,15}$", description="an existing interface to add as it is")
    ifname: str = Field("eth0", pattern=r"^[^/\s]{1,15}$", description="the interface's name inside the namespace")
    mac: str | None = Field(None, pattern=MAC_RE, description="the guest interface's MAC (default: random)")
    mtu: int | None = Field(None, ge=576, le=9000, description="default: the overlay's MTU")
    addresses: list[str] = Field(default_factory=list, description="static addresses inside the namespace, CIDR")
    dhcp_server: bool = Field(False, description="DHCP server messages from this guest are let through (one per overlay)")
    lock_mac: bool = Field(False, description="the guest may only send from its own MAC")

    @field_validator("addresses")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for a in v:
            try:
                ipaddress.ip_interface(a)
            except ValueError:
                raise ValueError(f"{a!r} is not an address with a prefix (e.g. 100.99.1.5/16)") from None
            if "/" not in a:
                raise ValueError(f"{a!r}: give the prefix too (e.g. 100.99.1.5/16)")
        return v

    @model_validator(mode="after")
    def _one_place(self):
        given = [k for k in ("netns", "pid", "interface") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of netns, pid and interface")
        if self.interface is not None and (self.addresses or self.mac or self.mtu):
            raise ValueError("an existing interface is added as it is: addresses, mac and mtu are for netns/pid guests")
        return self

    @property
    def kind(self) -> str:
        return "interface" if self.interface is not None else "netns"


class OverlayConfig(_Strict):
    name: str = Field(pattern=NAME_RE, description="overlay name: 1-10 lowercase letters/digits")
    kind: Literal["group", "social"] = "group"
    address: str = Field(description="this node's IPv4 address on the overlay, CIDR (e.g. 100.99.0.1/16)")
    address6: str | None = Field(None, description="IPv6 address on the overlay, CIDR (ULA fd00::/8)")
    mtu: int = Field(1400, ge=1280, le=9000)
    max_peers: int = Field(32, ge=1, le=1024)
    xmpp: XmppConfig
    ice: IceConfig = IceConfig()
    attach: list[AttachConfig] = Field(default_factory=list, description="guests plugged into the bridge at start")

    @field_validator("attach")
    @classmethod
    def _unique_guests(cls, v: list[AttachConfig]) -> list[AttachConfig]:
        names = [g.name for g in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"guest names repeat: {sorted(dup)}")
        return v

    @field_validator("address")
    @classmethod
    def _v4(cls, v: str) -> str:
        iface = ipaddress.ip_interface(v)
        if iface.version != 4 or iface.network.prefixlen == 32:
            raise ValueError("must be an IPv4 address with a prefix, e.g. 100.99.0.1/16")
        return v

    @field_validator("address6")
    @classmethod
    def _v6(cls, v: str | None) -> str | None:
        if v is not None and ipaddress.ip_interface(v).version != 6:
            raise ValueError("must be an IPv6 address with a prefix, e.g. fd00:99::1/64")
        return v

    @property
    def bridge(self) -> str:
        return f"ipsw{self.name}"   # <= 14 chars, IFNAMSIZ-safe


class OvsConfig(_Strict):
    mode: Literal["private", "system"] = "private"
    rundir: Path | None = Field(None, description="private OVS run directory (default <state_dir>/ovs)")
    datapath: Literal["auto", "system", "netdev"] = "auto"
    db_socket: Path = Field(Path("/var/run/openvswitch/db.sock"),
                            description="mode = system: the running OVS's database socket")


class NodeConfig(_Strict):
    identity_dir: Path = Path("/var/lib/ipop-switch")
    state_dir: Path = Path("/run/ipop-switch")
    metrics: str | None = Field("127.0.0.1:9465", description="host:port for Prometheus metrics, or empty to disable")
    worker_processes: int = Field(0, ge=0, le=64, description="tunnel worker processes (0: one per core but one, at least one)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Strict):
    node: NodeConfig = NodeConfig()
    ovs: OvsConfig = OvsConfig()
    overlay: list[OverlayConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self):
        names = [o.name for o in self.overlay]
        if len(set(names)) != len(names):
            raise ValueError(f"overlay names repeat: {names}")
        return self

    @property
    def status_socket(self) -> Path:
        return self.node.state_dir / "agent.sock"


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_config(path: Path | str) -> Config:
    """Read and validate; raise ConfigError naming the file and the field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (ipop-switch init writes a starter one)") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        msg = err["msg"].removeprefix("Value error, ")
        return_field = _where(err["loc"]) or "(top level)"
        raise ConfigError(f"{path}: {return_field}: {msg}{more}") from None
