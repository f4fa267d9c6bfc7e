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
from types import SimpleNamespace
from typing import Any, Callable

NODE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
PORT_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")  # Linux interface names
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_ALLOWED_MACS = 64  # per port: each allowed MAC costs a handful of table-0 flows
MAX_EDGES = 200_000
MAX_LINE = 1 << 20

# Checked by hand, not with a schema library: this is the one module the switch app imports
# besides os-ken, and pydantic with these models cost it ~10 MB RSS of a ~40 MB process.


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    return v


def _node_id(v: Any) -> str:
    if not NODE_ID_RE.match(_str(v)):
        raise ValueError("node id must be 32 lowercase hex characters")
    return v


def _port(v: Any) -> str:
    if not PORT_RE.match(_str(v)):
        raise ValueError(f"bad port name {v!r}")
    return v


def _unicast_mac(v: Any) -> str:
    v = _str(v).lower()
    if not MAC_RE.match(v):
        raise ValueError(f"bad MAC address {v!r}")
    if int(v[:2], 16) & 1 or v == "00:00:00:00:00:00":
        raise ValueError(f"{v} is not a station's (unicast) MAC address")
    return v


def _host_v4(v: Any) -> str:
    try:
        ip = ipaddress.IPv4Address(_str(v))
    except ValueError:
        raise ValueError(f"{v!r} is not an IPv4 address") from None
    if ip.is_multicast or ip.is_unspecified or ip == ipaddress.IPv4Address("255.255.255.255") or ip.is_loopback:
        raise ValueError(f"{v} is not a host's (unicast) address")
    return str(ip)


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int:                  # bool is an int subclass: not accepted
            raise ValueError("must be an integer")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return v
    return check


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise ValueError("must be true or false")
    return v


def _allowed_macs(v: Any) -> list[str] | None:
    if v is None:
        return None
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_ALLOWED_MACS:
        raise ValueError(f"must be null or a list of 1 to {MAX_ALLOWED_MACS} MAC addresses")
    return sorted({_unicast_mac(m) for m in v})


def _edges(v: Any) -> list[tuple[str, str]]:
    if not isinstance(v, list) or len(v) > MAX_EDGES:
        raise ValueError(f"must be a list of at most {MAX_EDGES} edges")
    out = []
    for e in v:
        if not isinstance(e, (list, tuple)) or len(e) != 2:
            raise ValueError("an edge is a pair of node ids")
        out.append((_node_id(e[0]), _node_id(e[1])))
    return out


_REQUIRED = object()
_QUERIES = ("status", "counters", "flows", "macs", "ports", "owner_bytes")

# op -> field -> (check, default); a malformed request fails as a whole, with the field named
SCHEMAS: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "set_datapath": {"dpid": (_int(0, 2**64 - 1), _REQUIRED)},
    "set_node_id": {"node_id": (_node_id, _REQUIRED)},
    "set_mtu": {"mtu": (_int(0, 65535), _REQUIRED)},
    "add_peer_port": {"port": (_port, _REQUIRED), "peer": (_node_id, _REQUIRED)},
    "remove_peer_port": {"port": (_port, _REQUIRED)},
    # dhcp_trusted: may answer DHCP / send router adverts (a guest running the DHCP server);
    # allowed_macs None: any source MAC
    "add_local_port": {"port": (_port, _REQUIRED), "dhcp_trusted": (_bool, False),
                       "allowed_macs": (_allowed_macs, None)},
    "remove_local_port": {"port": (_port, _REQUIRED)},
    "set_social": {"address": (_host_v4, _REQUIRED), "mac": (_unicast_mac, _REQUIRED)},
    "add_friend_port": {"port": (_port, _REQUIRED), "peer": (_node_id, _REQUIRED), "address": (_host_v4, _REQUIRED)},
    "remove_friend_port": {"port": (_port, _REQUIRED)},
    "set_topology": {"edges": (_edges, _REQUIRED)},
    **{q: {} for q in _QUERIES},
}


class Request(SimpleNamespace):
    """A parsed request: ``op`` and its fields as attributes (defaults filled in)."""


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


def parse_request(line: bytes | str) -> Request:
    """One request line -> a ``Request``; ChannelError (one line) on bad input."""
    if len(line) > MAX_LINE:
        raise ChannelError("request too long")
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ChannelError(f"not JSON: {e}") from None
    return validate(obj)


def validate(obj: Any) -> Request:
    """A decoded request object checked against its op's fields (ChannelError names the first
    bad one: ``bad request: <field>: <why>``)."""
    if not isinstance(obj, dict):
        raise ChannelError("bad request: must be a JSON object")
    op = obj.get("op")
    schema = SCHEMAS.get(op) if isinstance(op, str) else None
    if schema is None:
        raise ChannelError(f"bad request: op: unknown op {op!r}")
    fields: dict[str, Any] = {"op": op}
    for name in obj:
        if name != "op" and name not in schema:
            raise ChannelError(f"bad request: {name}: extra field not permitted")
    for name, (check, default) in schema.items():
        if name not in obj:
            if default is _REQUIRED:
                raise ChannelError(f"bad request: {name}: field required")
            fields[name] = default
            continue
        try:
            fields[name] = check(obj[name])
        except ValueError as e:
            raise ChannelError(f"bad request: {name}: {e}") from None
    return Request(**fields)


def encode(msg: dict[str, Any]) -> bytes:
    """A request or reply as one JSON line."""
    return (json.dumps(msg, separators=(",", ":")) + "\n").encode()


def ok(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def error(text: str) -> dict[str, Any]:
    return {"ok": False, "error": text}
