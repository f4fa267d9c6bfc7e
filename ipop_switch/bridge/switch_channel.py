"""Messages between the agent and the OpenFlow switch app (ryu_apps/).

The ONE module of ipop_switch the app imports: the channel is a unix socket with
one JSON object per line. The agent sends a request, the app answers with one
line ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. Kept free of
other ipop_switch imports so the app stays isolated from the agent.

Requests (field ``op``):
- ``set_datapath`` {dpid}               the bridge's datapath id: the app adopts only that switch and
                                        refuses (closes, counts) any other OpenFlow connection; until
                                        told, it refuses every one
- ``set_node_id``  {node_id}            this node's overlay node id (32 hex chars)
- ``set_mtu``      {mtu}                overlay MTU: TCP MSS is clamped to mtu-40 (IPv4) / mtu-60 (IPv6); 0 = off
- ``add_peer_port``    {port, peer}     OVS port name -> peer node id (port may appear in OVS before or after)
- ``remove_peer_port`` {port}
- ``add_local_port``   {port, dhcp_trusted=false, allowed_macs=null}
                                        a host-facing (guest) port besides the bridge's LOCAL port (always
                                        local and trusted); an untrusted port's DHCP server messages and
                                        IPv6 router adverts are dropped in the datapath; with allowed_macs,
                                        frames from any other source MAC are dropped (anti-spoofing)
- ``remove_local_port`` {port}
- ``set_social`` {address, mac}         SocialVPN (docs/social.md): this node's own social IPv4 address and
                                        its LOCAL port's MAC; frames from friend ports are rewritten to them
- ``add_friend_port`` {port, peer, address}
                                        a friend node's link: frames from it get source = address (what WE
                                        assigned that node) and destination = our own; ARP for address is
                                        answered by the app; nothing but IPv4 unicast crosses
- ``remove_friend_port`` {port}
- ``set_topology`` {edges}              the overlay graph as [[node_a, node_b], ...] (undirected); optional:
                                        without it the app assumes its peers form a full mesh
- ``status``   -> {connected, dpid, node_id, limits, ports}
- ``counters`` -> {counters: {name: int}}
- ``flows``    -> {flows: [{table, priority, match}]}: what the app has installed
- ``macs``     -> {macs: {mac: {port, owner}}}
- ``ports``    -> {ports: {name: {ofport, macs, rx_frames, rx_bytes, tx_frames, tx_bytes,
                                  drops: {dhcp, ra, spoof, macs_refused}, dhcp_trusted, allowed_macs}}}
                  per local port (LOCAL under the bridge's name, and the guests' ports)
- ``owner_bytes`` -> {owners: {node_id: bytes}}: bytes the unicast flows forwarded towards MACs
                  owned by each other node (transit included), since those flows were installed
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, TypeAdapter, ValidationError, field_validator

NODE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
PORT_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")  # Linux interface names
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_ALLOWED_MACS = 64  # per port: each allowed MAC costs a handful of table-0 flows
MAX_LINE = 1 << 20


def _node_id(v: str) -> str:
    if not NODE_ID_RE.match(v):
        raise ValueError("node id must be 32 lowercase hex characters")
    return v


def _port(v: str) -> str:
    if not PORT_RE.match(v):
        raise ValueError(f"bad port name {v!r}")
    return v


def _unicast_mac(v: str) -> str:
    v = v.lower()
    if not MAC_RE.match(v):
        raise ValueError(f"bad MAC address {v!r}")
    if int(v[:2], 16) & 1 or v == "00:00:00:00:00:00":
        raise ValueError(f"{v} is not a station's (unicast) MAC address")
    return v


def _host_v4(v: str) -> str:
    try:
        ip = ipaddress.IPv4Address(v)
    except ValueError:
        raise ValueError(f"{v!r} is not an IPv4 address") from None
    if ip.is_multicast or ip.is_unspecified or ip == ipaddress.IPv4Address("255.255.255.255") or ip.is_loopback:
        raise ValueError(f"{v} is not a host's (unicast) address")
    return str(ip)

# Fields checked on parse: a malformed request fails as a whole, with the field named.
PortName = Annotated[str, AfterValidator(_port)]
NodeId = Annotated[str, AfterValidator(_node_id)]
UnicastMac = Annotated[str, AfterValidator(_unicast_mac)]
HostV4 = Annotated[str, AfterValidator(_host_v4)]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SetDatapath(_Msg):
    op: Literal["set_datapath"] = "set_datapath"
    dpid: int = Field(ge=0, le=2**64 - 1)


class SetNodeId(_Msg):
    op: Literal["set_node_id"] = "set_node_id"
    node_id: NodeId


class SetMtu(_Msg):
    op: Literal["set_mtu"] = "set_mtu"
    mtu: int = Field(ge=0, le=65535)


class AddPeerPort(_Msg):
    op: Literal["add_peer_port"] = "add_peer_port"
    port: PortName
    peer: NodeId


class RemovePeerPort(_Msg):
    op: Literal["remove_peer_port"] = "remove_peer_port"
    port: PortName


class AddLocalPort(_Msg):
    op: Literal["add_local_port"] = "add_local_port"
    port: PortName
    dhcp_trusted: StrictBool = False  # may answer DHCP / send router adverts (a guest running the DHCP server)
    allowed_macs: list[str] | None = Field(default=None, min_length=1, max_length=MAX_ALLOWED_MACS)  # None: any

    @field_validator("allowed_macs")
    @classmethod
    def _macs(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else sorted({_unicast_mac(m) for m in v})


class RemoveLocalPort(_Msg):
    op: Literal["remove_local_port"] = "remove_local_port"
    port: PortName




class SetSocial(_Msg):
    op: Literal["set_social"] = "set_social"
    address: HostV4
    mac: UnicastMac


class AddFriendPort(_Msg):
    op: Literal["add_friend_port"] = "add_friend_port"
    port: PortName
    peer: NodeId
    address: HostV4


class RemoveFriendPort(_Msg):
    op: Literal["remove_friend_port"] = "remove_friend_port"
    port: PortName


class SetTopology(_Msg):
    op: Literal["set_topology"] = "set_topology"
    edges: list[tuple[NodeId, NodeId]] = Field(max_length=200_000)


class Query(_Msg):
    op: Literal["status", "counters", "flows", "macs", "ports", "owner_bytes"]


Request = Annotated[
    Union[SetDatapath, SetNodeId, SetMtu, AddPeerPort, RemovePeerPort, AddLocalPort, RemoveLocalPort, SetTopology,
          SetSocial, AddFriendPort, RemoveFriendPort, Query],
    Field(discriminator="op"),
]
_request_adapter: TypeAdapter[Any] = TypeAdapter(Request)

# Names of the counters the app reports (all ints, monotonic since app start).
COUNTERS = (
    "packet_in",  # packet-ins handled
    "flooded_origin",  # frames this node flooded as origin (datapath flow stats)
    "flooded_transit",  # flood frames forwarded/delivered for other roots (datapath flow stats)
    "flood_dropped",  # flood frames dropped by the tree/depth check (transients; datapath flow stats)
    "arp_suppressed",  # ARP requests answered from the learned table
    "nd_suppressed",  # IPv6 neighbour solicitations answered from the learned table
    "mss_clamped",  # TCP SYNs whose MSS was lowered
    "flows_installed",  # flow-mods that added or changed a flow
    "flows_active",  # flows the app currently has installed
    "macs_learned",  # MAC addresses in the table now
    "bad_frames",  # packet-ins that could not be parsed (counted drops)
    "macs_refused",  # source MACs not learned: the MAC table was full (in total or behind that port)
    "neighbours_evicted",  # snooped IP -> MAC bindings dropped, oldest first, past the cap
    "datapaths_refused",  # OpenFlow connections closed: not the bridge the agent named
    "dhcp_dropped",  # DHCPv4/v6 server messages from DHCP-untrusted local ports (datapath flow stats)
    "ra_dropped",  # IPv6 router adverts from DHCP-untrusted local ports (datapath flow stats)
    "spoof_dropped",  # frames from a MAC-locked port with a source MAC not allowed there (datapath flow stats)
    "moves_announced",  # stations that turned up here from elsewhere (or unknown) with a unicast first
                        # frame: the app flooded an announcement (RARP) from them so every node re-points
    "social_translated",  # IPv4 frames from friend ports rewritten to our view and delivered (datapath flow stats)
    "social_dropped",  # frames from friend ports not carried: not IPv4 unicast (datapath flow stats)
    "social_arp",  # ARP requests for friends' addresses answered by the app
)
# Per-port drop reasons in the ``ports`` reply.
PORT_DROPS = ("dhcp", "ra", "spoof", "macs_refused")
# Added by the agent (SwitchController.counters) from OVS's controller status, not the app:
# "packet_in_dropped": packet-ins OVS dropped at its per-port-fair rate limit (controller_rate_limit).


class ChannelError(ValueError):
    """A request line that is not valid JSON or not a known message."""


def parse_request(line: bytes | str) -> Any:
    """One request line -> a message object; ChannelError (one line) on bad input."""
    if len(line) > MAX_LINE:
        raise ChannelError("request too long")
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ChannelError(f"not JSON: {e}") from None
    try:
        return _request_adapter.validate_python(obj)
    except ValidationError as e:
        first = e.errors()[0]
        raise ChannelError(f"bad request: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def encode(msg: BaseModel | dict[str, Any]) -> bytes:
    """A message or reply as one JSON line."""
    obj = msg.model_dump() if isinstance(msg, BaseModel) else msg
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def ok(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def error(text: str) -> dict[str, Any]:
    return {"ok": False, "error": text}
