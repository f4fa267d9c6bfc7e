"""The node's TOML config, validated at start: every error names the field.

One file per node; one or more ``[[overlay]]`` tables, each with its own XMPP
account, ICE servers, trust material and bridge.
"""

from __future__ import annotations

import ipaddress
import re
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
    """'host', 'host:port', '[v6]:port' or a bare IPv6 literal (default port) -> (host, port)."""
    if v.startswith("[") and "]" in v:
        host, _, rest = v[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address {v!r} (use [v6]:port)")
        return host, (_hostport("x" + rest, default_port)[1] if rest else default_port)
    if v.count(":") > 1:
        return v, default_port
    host, sep, port = v.rpartition(":")
    if not sep:
        return v, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {v!r}")
    return host, int(port)


class XmppConfig(_Strict):
    server: str | None = Field(None, description="XMPP server host or address")
    port: int = Field(5222, ge=1, le=65535)
    servers: list[str] = Field(default_factory=list, description="instead of server: the nodes of a server cluster, "
                               "'host' or 'host:port', tried in order; on loss the next (docs/signaling.md)")
    jid: str = Field(pattern=r"^[^@/\s]+@[^@/\s]+$", description="this node's account, user@domain")
    password: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = Field(None, description="CA that signed the server certificate (default: system CAs)")
    room: str | None = Field(None, description="GroupVPN: the group's MUC room JID (default: <overlay>@conference.<domain>)")

    @model_validator(mode="after")
    def _one_password(self):
        if (self.password is None) == (self.password_file is None):
            raise ValueError("give exactly one of password and password_file")
        if not self.server and not self.servers:
            raise ValueError("give server (or servers, a list)")
        for s in self.servers:
            _hostport(s, self.port)
        return self

    def where(self) -> str:
        """The server(s) as the user wrote them, for messages."""
        return ", ".join(self.servers) if self.servers else f"{self.server}:{self.port}"

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
    port_prediction: bool = Field(True, description="a link relayed between a hard and an easy NAT tries birthday "
                                  "probing for a direct path (docs/nat.md); false: it stays relayed")
    ipv6: bool = Field(True, description="IPv6 candidates from the host's global and ULA addresses (never link-local)")

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
    moved: bool = Field(False, description="the guest moved here from another node with its MAC (a migrated VM, "
                        "a re-created container): its MAC still known elsewhere is not a conflict")

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


DNS_LABEL_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
DNS_LISTEN_WORDS = ("overlay", "overlay6", "loopback")


def dns_loopback(overlay: str) -> str:
    """The 127/8 address an overlay's DNS responder listens on by default: derived from the
    overlay's name (stable across restarts and config reordering, different per overlay);
    never 127.0.0.53/54, which systemd-resolved uses. Linux answers all of 127/8 on lo, so
    nothing has to be configured to bind it."""
    import hashlib
    h = hashlib.sha256(f"ipsw-dns/{overlay}".encode()).digest()
    return f"127.53.{h[0]}.{h[1] % 254 + 1}"


def split_hostport(v: str, default_port: int) -> tuple[str, int]:
    """'1.2.3.4', '1.2.3.4:53', '[fd00::1]:53' or 'fd00::1' -> (address, port); ValueError if
    the address is not an IP literal or the port is bad."""
    host, port = v, default_port
    if v.startswith("["):
        host, sep, rest = v[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {v!r} (use [v6]:port)")
        if rest:
            port = _hostport("x" + rest, default_port)[1]
    elif v.count(":") == 1:
        host, port = _hostport(v, default_port)
    ipaddress.ip_address(host)      # raises ValueError naming the text
    return host, port


class DnsConfig(_Strict):
    """The overlay's DNS responder (docs/naming.md): answers <node>.<overlay>.<suffix> and
    <guest>.<node>.<overlay>.<suffix> with overlay addresses. Off unless enabled."""
    enable: bool = False
    suffix: str = Field("ipsw.internal", description="zone suffix: names are <node>.<overlay>.<suffix> "
                        "(.internal is reserved by ICANN for private use)")
    name: str | None = Field(None, pattern=DNS_LABEL_RE,
                             description="this node's name in the zone (default: its certificate's common name)")
    port: int = Field(53, ge=1, le=65535, description="UDP port on every listen address")
    listen: list[str] = Field(default_factory=lambda: ["overlay", "loopback"],
                              description="'overlay' (the IPv4 overlay address), 'overlay6', 'loopback' "
                                          "(127.53.x.y derived from the overlay name) or IP literals")
    loopback: str | None = Field(None, description="the 127/8 address 'loopback' means (default: derived)")
    forward: list[str] = Field(default_factory=list, description="upstream resolvers ('ip[:port]') for names "
                               "outside the zone; empty: such queries are REFUSED")
    ttl: int = Field(60, ge=0, le=86400, description="TTL of answers, seconds")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str) -> str:
        v = v.strip(".").lower()
        labels = v.split(".")
        if not v or len(v) > 200 or not all(re.match(DNS_LABEL_RE, x) for x in labels):
            raise ValueError(f"{v!r} is not a domain name (labels of a-z, 0-9 and '-', e.g. ipsw.internal)")
        return v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one address ('overlay', 'overlay6', 'loopback' or an IP)")
        for x in v:
            if x not in DNS_LISTEN_WORDS:
                try:
                    ipaddress.ip_address(x)
                except ValueError:
                    raise ValueError(f"{x!r}: not 'overlay', 'overlay6', 'loopback' or an IP address") from None
        return v

    @field_validator("loopback")
    @classmethod
    def _loopback(cls, v: str | None) -> str | None:
        if v is not None and not (ipaddress.ip_address(v).version == 4 and ipaddress.ip_address(v).is_loopback):
            raise ValueError(f"{v!r} is not a 127/8 address")
        return v

    @field_validator("forward")
    @classmethod
    def _forward(cls, v: list[str]) -> list[str]:
        for x in v:
            try:
                split_hostport(x, 53)
            except ValueError as e:
                raise ValueError(f"forward {x!r}: {e}") from None
        return v

    def forward_addrs(self) -> list[tuple[str, int]]:
        return [split_hostport(x, 53) for x in self.forward]


class TopologyConfig(_Strict):
    """Which links a node keeps (docs/topology.md): all-to-all up to ``all_to_all_max``
    members, a Symphony ring with long and on-demand links above."""
    all_to_all_max: int = Field(8, ge=1, le=4096, description="up to this many members (me included): all-to-all")
    successors: int = Field(2, ge=1, le=8, description="ring links opened clockwise")
    long_links: int | None = Field(None, ge=0, le=64, description="long links per node (default floor(log2 N))")
    max_degree: int = Field(24, ge=2, le=1024, description="links per node, never exceeded (also capped by max_peers)")
    ondemand_slots: int = Field(4, ge=0, le=64, description="of max_degree, kept free of long links for on-demand ones")
    ondemand_threshold_bps: float = Field(1e6, ge=0, description="bytes/s towards a member that earn a direct link; 0: off")
    ondemand_window: float = Field(10.0, gt=0, le=3600, description="s over which that rate is measured")
    ondemand_idle: float = Field(60.0, gt=0, le=86400, description="s below a quarter of the threshold before an on-demand link goes")
    max_new_links_per_min: int = Field(10, ge=1, le=1000)
    min_link_age: float = Field(30.0, ge=0, le=86400, description="an idle link not replaced is released only this old")
    request_timeout: float = Field(30.0, gt=0, le=3600, description="a requested link not up by then is given up (and backed off)")
    retry_backoff: float = Field(60.0, ge=0, le=86400, description="s before asking again a peer that refused or failed (x2 per failure, up to x8)")
    cycle: float = Field(10.0, gt=0, le=3600, description="s between two looks at the links (and after every change)")


class SocialConfig(_Strict):
    """SocialVPN (kind = "social", docs/social.md): friends from the XMPP roster. The overlay's
    ``address`` is this node's own social address; its network is the range friends' nodes get
    their local addresses from."""
    node: str | None = Field(None, pattern=DNS_LABEL_RE, description="this node's name among your devices: "
                             "its XMPP resource and its host name for friends (default: the host name)")
    addresses: dict[str, str] = Field(default_factory=dict, description="fixed local addresses for friends' "
                                      "nodes: {\"bob@example.org/laptop\" = \"100.80.0.20\"}")
    suffix: str = Field("ipsw.internal", pattern=r"^[a-z0-9.-]{1,200}$",
                        description="names for 'friends hosts': <node>.<friend>.<suffix>")


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
    dns: DnsConfig = DnsConfig()
    topology: TopologyConfig = TopologyConfig()
    social: SocialConfig = SocialConfig()

    @model_validator(mode="after")
    def _social(self):
        if self.kind == "social" and self.address6:
            raise ValueError("a social overlay carries IPv4 only (docs/social.md): remove address6")
        if self.kind == "social" and self.attach:
            raise ValueError("a social overlay has one host, the node itself: guests are for group overlays")
        return self

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


class WebConfig(_Strict):
    """The overlay view in a browser (docs/web.md): read-only, served by the agent. Off unless
    enabled; loopback by default (the page shows the whole overlay's addresses and links)."""
    enable: bool = False
    listen: str = Field("127.0.0.1:9466", description="address:port of the page ('[v6]:port' for IPv6)")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        try:
            host, _ = split_hostport(v, 0)
        except ValueError as e:
            raise ValueError(f"{v!r}: {e} (e.g. 127.0.0.1:9466)") from None
        if not ((v.startswith("[") and "]:" in v) or (not v.startswith("[") and v.count(":") == 1)):
            raise ValueError(f"{v!r}: give address:port (e.g. 127.0.0.1:9466)")
        return v

    def addr(self) -> tuple[str, int]:
        return split_hostport(self.listen, 9466)


class NodeConfig(_Strict):
    identity_dir: Path = Path("/var/lib/ipop-switch")
    state_dir: Path = Path("/run/ipop-switch")
    metrics: str | None = Field("127.0.0.1:9465", description="host:port for Prometheus metrics, or empty to disable")
    worker_processes: int = Field(0, ge=0, le=64, description="tunnel worker processes (0: one per core but one, at least one)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    web: WebConfig = WebConfig()


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

    @model_validator(mode="after")
    def _dns_addresses(self):
        """Two overlays' responders may not share an address and port."""
        seen: dict[tuple[str, int], str] = {}
        for o in self.overlay:
            if not o.dns.enable:
                continue
            for x in o.dns.listen:
                addr = (o.dns.loopback or dns_loopback(o.name)) if x == "loopback" else x
                if x in ("overlay", "overlay6"):
                    continue      # each overlay has its own addresses
                if (addr, o.dns.port) in seen:
                    raise ValueError(f"overlay {o.name}: dns listens on {addr}:{o.dns.port} like overlay "
                                     f"{seen[(addr, o.dns.port)]}: set [overlay.dns] loopback or port")
                seen[(addr, o.dns.port)] = o.name
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
