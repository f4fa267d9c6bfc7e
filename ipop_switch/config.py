"""The node's TOML config, validated at start: every error names the field.

One file per node; one or more ``[[overlay]]`` tables, each with its own XMPP
account, ICE servers, trust material and bridge.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, TypeVar

import msgspec
from msgspec import Meta, field

from . import hostport
from .errors import IpopError

NAME_RE = r"^[a-z][a-z0-9]{0,9}$"


class ConfigError(IpopError):
    pass


T = TypeVar("T", bound="_Strict")


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A config table: unknown keys are errors (a typo is not silently ignored), values frozen.

    msgspec rather than pydantic: the same checks (types, ranges, patterns, our own rules in
    ``__post_init__``) with errors naming the field; pydantic and these models took 20 MB into
    an interpreter, msgspec 4 (the running agent 63 -> 54 MB RSS)."""

    @classmethod
    def parse(cls: type[T], data: Any) -> T:
        """Validate ``data`` (a dict from TOML or a request) into this table, or raise
        ConfigError('<field path>: <what is wrong>')."""
        try:
            return msgspec.convert(data, cls, dec_hook=_decode)
        except msgspec.ValidationError as e:
            raise ConfigError(explain(e)) from None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return cls.__struct_fields__

    def replace(self: T, **changes: Any) -> T:
        """A copy with ``changes`` (values already validated: taken from another parsed config)."""
        return msgspec.structs.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self, enc_hook=str)


def _decode(t: type, v: Any) -> Any:
    """Values of types msgspec does not know (paths); a TypeError becomes a ValidationError."""
    if t is Path and isinstance(v, str):
        return Path(v)
    raise TypeError(f"expected {getattr(t, '__name__', t)} as a string, got {type(v).__name__}")


def _bad(name: str, msg: str) -> ValueError:
    """An error of one field found in ``__post_init__``: msgspec places it at the table, so the
    field's name rides in front of the message for ``explain`` to move into the path."""
    return ValueError(f"\0{name}\0{msg}")


def _checked(name: str, check: Callable[..., Any], *args: Any, **kw: Any) -> None:
    try:
        check(*args, **kw)
    except ValueError as e:
        raise _bad(name, str(e)) from None


_MISSING = re.compile(r"Object missing required field `(\w+)`")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`")


def explain(e: msgspec.ValidationError) -> str:
    """'Expected `int` >= 1 - at `$.overlay[0].dns.port`' -> 'overlay[0].dns.port: expected int >= 1'."""
    msg, _, where = str(e).partition(" - at `$")
    where = where.rstrip("`").lstrip(".")
    for rx, what in ((_MISSING, "required, missing"), (_UNKNOWN, "unknown key (a typo?)")):
        m = rx.fullmatch(msg)
        if m:
            where, msg = (f"{where}.{m[1]}" if where else m[1]), what
    if msg.startswith("\0"):
        _, name, msg = msg.split("\0", 2)
        where = f"{where}.{name}" if where else name
    msg = msg.replace("`", "")
    msg = msg[:1].lower() + msg[1:]
    return f"{where}: {msg}" if where else msg


def _d(text: str, **constraints: Any) -> Meta:
    """A field's constraints and its description (the description is for readers of the code)."""
    return Meta(description=text, **constraints)


Port = Annotated[int, Meta(ge=1, le=65535)]


class XmppConfig(_Strict, kw_only=True):
    jid: Annotated[str, _d("this node's account, user@domain", pattern=r"^[^@/\s]+@[^@/\s]+$")]
    server: Annotated[str | None, _d("XMPP server host or address")] = None
    port: Port = 5222
    servers: Annotated[list[str], _d("instead of server: the nodes of a server cluster, 'host' or 'host:port', "
                                     "tried in order; on loss the next (docs/signaling.md)")] = field(default_factory=list)
    password: str | None = None
    password_file: Path | None = None
    ca_file: Annotated[Path | None, _d("CA that signed the server certificate (default: system CAs)")] = None
    room: Annotated[str | None, _d("GroupVPN: the group's MUC room JID (default: <overlay>@conference.<domain>)")] = None

    def __post_init__(self) -> None:
        if (self.password is None) == (self.password_file is None):
            raise ValueError("give exactly one of password and password_file")
        if not self.server and not self.servers:
            raise ValueError("give server (or servers, a list)")
        for s in self.servers:
            _checked("servers", hostport.split, s, self.port)

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


class IceConfig(_Strict, kw_only=True):
    stun: Annotated[str | None, _d("host:port of a STUN server")] = None
    turn: Annotated[str | None, _d("host:port of a TURN server")] = None
    turn_user: str | None = None
    turn_password: str | None = None
    turn_transport: Literal["udp", "tcp"] = "udp"
    ignore_interfaces: Annotated[list[str], _d("interfaces left out of candidate gathering")] = field(default_factory=list)
    port_prediction: Annotated[bool, _d("a link relayed between a hard and an easy NAT tries birthday probing for "
                                        "a direct path (docs/nat.md); false: it stays relayed")] = True
    ipv6: Annotated[bool, _d("IPv6 candidates from the host's global and ULA addresses (never link-local)")] = True

    def __post_init__(self) -> None:
        for name in ("stun", "turn"):
            if getattr(self, name) is not None:
                _checked(name, hostport.split, getattr(self, name), 3478)
        if self.turn and not (self.turn_user and self.turn_password):
            raise ValueError("turn needs turn_user and turn_password")

    def stun_addr(self) -> tuple[str, int] | None:
        return hostport.split(self.stun, 3478) if self.stun else None

    def turn_addr(self) -> tuple[str, int] | None:
        return hostport.split(self.turn, 3478) if self.turn else None


GUEST_NAME_RE = r"^[a-z0-9][a-z0-9_.-]{0,31}$"
MAC_RE = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"


IfName = Annotated[str, Meta(pattern=r"^[^/\s]{1,15}$")]


class AttachConfig(_Strict, kw_only=True):
    """A guest plugged into the overlay's bridge: a network namespace or container (a veth
    pair, one end inside), or an existing interface (a VM's TAP, a NIC, a veth into a Linux
    bridge) added as it is."""
    name: Annotated[str, _d("guest name, unique in the overlay", pattern=GUEST_NAME_RE)]
    netns: Annotated[str | None, _d("namespace name (ip netns) or path (/proc/PID/ns/net, /run/netns/x)")] = None
    pid: Annotated[int, _d("a process in the namespace (a container's PID)", ge=1)] | None = None
    interface: Annotated[IfName | None, _d("an existing interface to add as it is")] = None
    ifname: Annotated[IfName, _d("the interface's name inside the namespace")] = "eth0"
    mac: Annotated[str, _d("the guest interface's MAC (default: random)", pattern=MAC_RE)] | None = None
    mtu: Annotated[int, _d("default: the overlay's MTU", ge=576, le=9000)] | None = None
    addresses: Annotated[list[str], _d("static addresses inside the namespace, CIDR")] = field(default_factory=list)
    dhcp_server: Annotated[bool, _d("DHCP server messages from this guest are let through (one per overlay)")] = False
    lock_mac: Annotated[bool, _d("the guest may only send from its own MAC")] = False
    moved: Annotated[bool, _d("the guest moved here from another node with its MAC (a migrated VM, a re-created "
                              "container): its MAC still known elsewhere is not a conflict")] = False

    def __post_init__(self) -> None:
        for a in self.addresses:
            try:
                ipaddress.ip_interface(a)
            except ValueError:
                raise _bad("addresses", f"{a!r} is not an address with a prefix (e.g. 100.99.1.5/16)") from None
            if "/" not in a:
                raise _bad("addresses", f"{a!r}: give the prefix too (e.g. 100.99.1.5/16)")
        given = [k for k in ("netns", "pid", "interface") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of netns, pid and interface")
        if self.interface is not None and (self.addresses or self.mac or self.mtu):
            raise ValueError("an existing interface is added as it is: addresses, mac and mtu are for netns/pid guests")

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


class DnsConfig(_Strict, kw_only=True):
    """The overlay's DNS responder (docs/naming.md): answers <node>.<overlay>.<suffix> and
    <guest>.<node>.<overlay>.<suffix> with overlay addresses. Off unless enabled."""
    enable: bool = False
    suffix: Annotated[str, _d("zone suffix: names are <node>.<overlay>.<suffix> (.internal is reserved by ICANN "
                              "for private use)")] = "ipsw.internal"
    name: Annotated[str, _d("this node's name in the zone (default: its certificate's common name)",
                            pattern=DNS_LABEL_RE)] | None = None
    port: Annotated[int, _d("UDP port on every listen address", ge=1, le=65535)] = 53
    listen: Annotated[list[str], _d("'overlay' (the IPv4 overlay address), 'overlay6', 'loopback' (127.53.x.y "
                                    "derived from the overlay name) or IP literals")] = \
        field(default_factory=lambda: ["overlay", "loopback"])
    loopback: Annotated[str | None, _d("the 127/8 address 'loopback' means (default: derived)")] = None
    forward: Annotated[list[str], _d("upstream resolvers ('ip[:port]') for names outside the zone; empty: such "
                                     "queries are REFUSED")] = field(default_factory=list)
    ttl: Annotated[int, _d("TTL of answers, seconds", ge=0, le=86400)] = 60

    def __post_init__(self) -> None:
        suffix = self.suffix.strip(".").lower()
        if not suffix or len(suffix) > 200 or not all(re.match(DNS_LABEL_RE, x) for x in suffix.split(".")):
            raise _bad("suffix", f"{suffix!r} is not a domain name (labels of a-z, 0-9 and '-', e.g. ipsw.internal)")
        msgspec.structs.force_setattr(self, "suffix", suffix)
        if not self.listen:
            raise _bad("listen", "give at least one address ('overlay', 'overlay6', 'loopback' or an IP)")
        for x in self.listen:
            if x not in DNS_LISTEN_WORDS:
                try:
                    ipaddress.ip_address(x)
                except ValueError:
                    raise _bad("listen", f"{x!r}: not 'overlay', 'overlay6', 'loopback' or an IP address") from None
        v = self.loopback
        if v is not None and not (_ip(v) and _ip(v).version == 4 and _ip(v).is_loopback):  # type: ignore[union-attr]
            raise _bad("loopback", f"{v!r} is not a 127/8 address")
        for x in self.forward:
            _checked("forward", hostport.split, x, 53, ip=True)

    def forward_addrs(self) -> list[tuple[str, int]]:
        return [hostport.split(x, 53, ip=True) for x in self.forward]


def _ip(v: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(v)
    except ValueError:
        return None


class TopologyConfig(_Strict, kw_only=True):
    """Which links a node keeps (docs/topology.md): all-to-all up to ``all_to_all_max``
    members, a Symphony ring with long and on-demand links above."""
    all_to_all_max: Annotated[int, _d("up to this many members (me included): all-to-all", ge=1, le=4096)] = 8
    successors: Annotated[int, _d("ring links opened clockwise", ge=1, le=8)] = 2
    long_links: Annotated[int, _d("long links per node (default floor(log2 N))", ge=0, le=64)] | None = None
    max_degree: Annotated[int, _d("links per node, never exceeded (also capped by max_peers)", ge=2, le=1024)] = 24
    ondemand_slots: Annotated[int, _d("of max_degree, kept free of long links for on-demand ones", ge=0, le=64)] = 4
    ondemand_threshold_bps: Annotated[float, _d("bytes/s towards a member that earn a direct link; 0: off", ge=0)] = 1e6
    ondemand_window: Annotated[float, _d("s over which that rate is measured", gt=0, le=3600)] = 10.0
    ondemand_idle: Annotated[float, _d("s below a quarter of the threshold before an on-demand link goes",
                                       gt=0, le=86400)] = 60.0
    max_new_links_per_min: Annotated[int, Meta(ge=1, le=1000)] = 10
    min_link_age: Annotated[float, _d("an idle link not replaced is released only this old", ge=0, le=86400)] = 30.0
    request_timeout: Annotated[float, _d("a requested link not up by then is given up (and backed off)",
                                         gt=0, le=3600)] = 30.0
    retry_backoff: Annotated[float, _d("s before asking again a peer that refused or failed (x2 per failure, up "
                                       "to x8)", ge=0, le=86400)] = 60.0
    cycle: Annotated[float, _d("s between two looks at the links (and after every change)", gt=0, le=3600)] = 10.0


class SocialConfig(_Strict, kw_only=True):
    """SocialVPN (kind = "social", docs/social.md): friends from the XMPP roster. The overlay's
    ``address`` is this node's own social address; its network is the range friends' nodes get
    their local addresses from."""
    node: Annotated[str, _d("this node's name among your devices: its XMPP resource and its host name for friends "
                            "(default: the host name)", pattern=DNS_LABEL_RE)] | None = None
    addresses: Annotated[dict[str, str], _d("fixed local addresses for friends' nodes: "
                                            "{\"bob@example.org/laptop\" = \"100.80.0.20\"}")] = field(default_factory=dict)
    suffix: Annotated[str, _d("names for 'friends hosts': <node>.<friend>.<suffix>",
                              pattern=r"^[a-z0-9.-]{1,200}$")] = "ipsw.internal"


class OverlayConfig(_Strict, kw_only=True):
    name: Annotated[str, _d("overlay name: 1-10 lowercase letters/digits", pattern=NAME_RE)]
    address: Annotated[str, _d("this node's IPv4 address on the overlay, CIDR (e.g. 100.99.0.1/16)")]
    xmpp: XmppConfig
    kind: Literal["group", "social"] = "group"
    address6: Annotated[str | None, _d("IPv6 address on the overlay, CIDR (ULA fd00::/8)")] = None
    mtu: Annotated[int, Meta(ge=1280, le=9000)] = 1400
    max_peers: Annotated[int, Meta(ge=1, le=1024)] = 32
    ice: IceConfig = field(default_factory=IceConfig)
    attach: Annotated[list[AttachConfig], _d("guests plugged into the bridge at start")] = field(default_factory=list)
    dns: DnsConfig = field(default_factory=DnsConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    social: SocialConfig = field(default_factory=SocialConfig)

    def __post_init__(self) -> None:
        iface = _interface(self.address, "address")
        if iface.version != 4 or iface.network.prefixlen == 32:
            raise _bad("address", "must be an IPv4 address with a prefix, e.g. 100.99.0.1/16")
        if self.address6 is not None and _interface(self.address6, "address6").version != 6:
            raise _bad("address6", "must be an IPv6 address with a prefix, e.g. fd00:99::1/64")
        names = [g.name for g in self.attach]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise _bad("attach", f"guest names repeat: {sorted(dup)}")
        if self.kind == "social" and self.address6:
            raise ValueError("a social overlay carries IPv4 only (docs/social.md): remove address6")
        if self.kind == "social" and self.attach:
            raise ValueError("a social overlay has one host, the node itself: guests are for group overlays")

    @property
    def bridge(self) -> str:
        return f"ipsw{self.name}"   # <= 14 chars, IFNAMSIZ-safe


def _interface(v: str, what: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        return ipaddress.ip_interface(v)
    except ValueError:
        raise _bad(what, f"{v!r} is not an address with a prefix") from None


class OvsConfig(_Strict, kw_only=True):
    mode: Literal["private", "system"] = "private"
    rundir: Annotated[Path | None, _d("private OVS run directory (default <state_dir>/ovs)")] = None
    datapath: Literal["auto", "system", "netdev"] = "auto"
    db_socket: Annotated[Path, _d("mode = system: the running OVS's database socket")] = \
        Path("/var/run/openvswitch/db.sock")


class WebConfig(_Strict, kw_only=True):
    """The overlay view in a browser (docs/web.md): read-only, served by the agent. Off unless
    enabled; loopback by default (the page shows the whole overlay's addresses and links)."""
    enable: bool = False
    listen: Annotated[str, _d("address:port of the page ('[v6]:port' for IPv6)")] = "127.0.0.1:9466"

    def __post_init__(self) -> None:
        v = self.listen
        _checked("listen", hostport.split, v, 9466, ip=True)
        if not ((v.startswith("[") and "]:" in v) or (not v.startswith("[") and v.count(":") == 1)):
            raise _bad("listen", f"{v!r}: give address:port (e.g. 127.0.0.1:9466)")

    def addr(self) -> tuple[str, int]:
        return hostport.split(self.listen, 9466, ip=True)


class NodeConfig(_Strict, kw_only=True):
    identity_dir: Path = Path("/var/lib/ipop-switch")
    state_dir: Path = Path("/run/ipop-switch")
    metrics: Annotated[str | None, _d("host:port for Prometheus metrics, or empty to disable")] = "127.0.0.1:9465"
    worker_processes: Annotated[int, _d("tunnel worker processes (0: one per core but one, at least one)",
                                        ge=0, le=64)] = 0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    web: WebConfig = field(default_factory=WebConfig)


class Config(_Strict, kw_only=True):
    overlay: Annotated[list[OverlayConfig], Meta(min_length=1)]
    node: NodeConfig = field(default_factory=NodeConfig)
    ovs: OvsConfig = field(default_factory=OvsConfig)

    def __post_init__(self) -> None:
        names = [o.name for o in self.overlay]
        if len(set(names)) != len(names):
            raise ValueError(f"overlay names repeat: {names}")
        self._dns_addresses()

    def _dns_addresses(self) -> None:
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

    @property
    def status_socket(self) -> Path:
        return self.node.state_dir / "agent.sock"


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
        return Config.parse(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
