"""Agent-side handle on the OpenFlow switch app (ryu_apps/): start it, point the bridge at
it, and tell it the node id, which port leads to which peer, and the overlay graph.

The app runs as a child process (crash isolation) inside the node's namespace. Both its
sockets, the agent's channel and the OpenFlow controller (``unix:`` for OVS), live in a
private directory (0700) of the node's run directory: no other local user can connect a
fake switch or stand in for the app while it restarts, as a TCP port on 127.0.0.1 allowed
(security review, finding 3). The bridge's datapath id is pinned and told to the app,
which refuses any other switch. The bridge connects out-of-band with a small max_backoff,
so a restarted app is found again within a second, not OVS's default 8 s, and OVS limits
packet-ins per port, fairly (``controller_rate_limit``), so no port can flood the app.
Before any traffic we wait until the app holds this bridge's connection and has read its
ports; OVS's ``is_connected`` column lags by seconds, the app does not. Requests go over
the channel as JSON lines (messages: switch_channel.py); every state-changing request
returns once the switch has the new flows (barrier).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from .. import proc
from ..errors import IpopError
from . import switch_channel as ch
from .ovs import OvsInstance


class SwitchAppError(IpopError):
    """The switch app failed to start, died or refused a request."""


class SwitchController:
    """One OpenFlow app for one bridge. Async: the agent runs one asyncio loop."""

    def __init__(
        self,
        ovs: OvsInstance,
        bridge: str,
        *,
        rundir: Path | None = None,
        aging: int = 300,
        mtu: int = 0,
        max_macs: int = 8192,
        max_macs_per_port: int = 1024,
        packet_in_rate: int = 1000,
        packet_in_burst: int = 250,
        python: str = sys.executable,
        log_dir: Path | None = None,
    ) -> None:
        """``max_macs``/``max_macs_per_port``: the app's MAC table caps (a MAC over them is not
        learned, its frames are flooded); ``packet_in_rate`` (>= 100/s) and ``packet_in_burst``
        (>= 25): OVS's per-port-fair limit on frames sent to the app. The sockets live under
        ``rundir`` (default the OVS's run directory: ovs-vswitchd connects to unix controllers only
        there); ``log_dir``: where the app's log goes (default ``rundir``)."""
        self.ovs, self.bridge = ovs, bridge
        self.aging, self.mtu, self.python = aging, mtu, python
        self.max_macs, self.max_macs_per_port = max_macs, max_macs_per_port
        self.packet_in_rate, self.packet_in_burst = max(100, packet_in_rate), max(25, packet_in_burst)
        self.rundir = Path(rundir or ovs.rundir).absolute()
        sockdir = self.rundir / f"switch-{bridge}"
        if len(str(sockdir / "app.sock")) > 100:  # sun_path is 108 bytes
            sockdir = Path(tempfile.mkdtemp(prefix="ipsw-sw-"))  # 0700 too
        self.sock_dir = sockdir
        self.sock_path = sockdir / "app.sock"  # the agent's channel
        self.ofp_path = sockdir / "ofp.sock"  # OpenFlow: OVS connects here
        self.dpid: int | None = None
        self.log_path = Path(log_dir or self.rundir) / f"switch-{bridge}.log"
        self._proc = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._replay: dict[str, dict] = {}  # what we told the app, sent again after a restart

    # ------------------------------------------------------------------ lifecycle
    async def start(self, *, timeout: float = 15.0) -> "SwitchController":
        """Spawn the app, set the bridge's controller, wait until the switch is connected."""
        self.rundir.mkdir(parents=True, exist_ok=True)
        private_dir(self.sock_dir)
        # pinned and named before the app starts: the bridge may connect the moment the socket exists
        self.dpid = await asyncio.to_thread(self._pin_dpid)
        self._proc = proc.spawn(
            [self.python, "-m", "ryu_apps.launch", "--channel", str(self.sock_path),
             "--ofp-socket", str(self.ofp_path), "--dpid", f"{self.dpid:#x}", "--aging", str(self.aging),
             "--mtu", str(self.mtu), "--max-macs", str(self.max_macs),
             "--max-macs-per-port", str(self.max_macs_per_port), "--ovs-rundir", str(self.ovs.rundir)],
            netns=self.ovs.netns, log=self.log_path,
            die_with_parent=True,      # the app never outlives the agent (kill -9 included)
        )
        try:
            await self._wait(lambda: (self.sock_path.exists() and self.ofp_path.exists())
                             or self._proc.poll() is not None, timeout, "app sockets")
            await self._connect_channel(timeout)
            await asyncio.to_thread(self._point_bridge)
            await self._wait_connected(timeout)
            for msg in list(self._replay.values()):
                await self._call(msg)
        except BaseException:
            await self.stop()
            raise
        return self

    async def _connect_channel(self, timeout: float) -> None:
        """Connect to the app's socket. The file appears at bind(), a moment before the app
        listens: a refused connection in that window is retried (bounded), not an error."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(str(self.sock_path))
                return
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    def _point_bridge(self) -> None:
        v = self.ovs.vsctl
        # two VLAN tags (root, depth) ride on flood frames between nodes: OVS must parse both
        v("set", "Open_vSwitch", ".", "other_config:vlan-limit=2")
        v("set", "bridge", self.bridge, "protocols=OpenFlow13", "fail_mode=secure")
        v("set-controller", self.bridge, f"unix:{self.ofp_path}")
        v("--", "set", "controller", self.bridge, "connection-mode=out-of-band", "max_backoff=1000",
          "inactivity_probe=5000", f"controller_rate_limit={self.packet_in_rate}",
          f"controller_burst_limit={self.packet_in_burst}")

    def _dpid(self) -> int:
        return int(self.ovs.vsctl("get", "bridge", self.bridge, "datapath_id").strip().strip('"'), 16)

    def _pin_dpid(self) -> int:
        """The bridge's datapath id, pinned: OVS would derive a new one from a port's MAC
        (and reconnect under it) if ports change while the bridge has no fixed address."""
        dpid = self._dpid()
        self.ovs.vsctl("set", "bridge", self.bridge, f"other-config:datapath-id={dpid:016x}")
        return dpid

    def _packet_in_dropped(self) -> int:
        """Packet-ins OVS dropped at the rate limit (its controller status, refreshed every few s)."""
        out = self.ovs.vsctl("--format=json", "--columns=status", "list", "controller")
        total = 0
        for row in json.loads(out).get("data", []):
            for k, v in row[0][1] if row and row[0][0] == "map" else []:
                if k.startswith("packet-in-") and k.endswith("-dropped"):
                    total += int(v)
        return total

    async def _wait_connected(self, timeout: float) -> None:
        """Until the app holds this bridge's OpenFlow connection and has read its ports.

        The app's word is taken rather than OVS's ``is_connected`` column, which
        ovs-vswitchd refreshes only every few seconds (5 s after a restart here).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        dpid = self.dpid
        while True:
            self._check_alive()
            st = await self._call({"op": "status"})
            if st.get("connected") and st.get("dpid") == dpid:
                return
            if loop.time() > deadline:
                raise SwitchAppError(f"bridge {self.bridge} did not connect to the switch app within {timeout:.0f}s "
                                     f"(log: {self.log_path})")
            await asyncio.sleep(0.02)

    async def _wait(self, pred, timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not pred():
            if loop.time() > deadline:
                raise SwitchAppError(f"timed out after {timeout:.0f}s waiting for the switch {what}")
            await asyncio.sleep(0.02)

    def _check_alive(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            tail = ""
            try:
                tail = self.log_path.read_text().strip().splitlines()[-1]
            except (OSError, IndexError):
                pass
            raise SwitchAppError(f"the switch app exited: {tail or 'no log'}")

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    async def restart(self, *, timeout: float = 15.0) -> None:
        """After a crash: start again and replay node id, MTU, ports and topology."""
        await self.stop(keep_state=True)
        await self.start(timeout=timeout)

    async def stop(self, *, keep_state: bool = False) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = self._reader = None
        if self._proc is not None:
            await asyncio.to_thread(proc.terminate, self._proc.pid)
            self._proc = None
        for path in (self.sock_path, self.ofp_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        if not keep_state:
            self._replay.clear()
            try:
                self.sock_dir.rmdir()    # empty now; in the system's OVS run directory it would linger
            except OSError:
                pass

    # ------------------------------------------------------------------ requests
    async def _call(self, msg: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
        if self._writer is None or self._reader is None:
            raise SwitchAppError("the switch app is not running")
        async with self._lock:
            try:
                self._writer.write(ch.encode(msg))
                await self._writer.drain()
                line = await asyncio.wait_for(self._reader.readline(), timeout)
            except (OSError, asyncio.TimeoutError) as e:
                raise SwitchAppError(f"switch app channel: {type(e).__name__} {e}") from None
        if not line:
            raise SwitchAppError("the switch app closed its channel")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise SwitchAppError(f"switch app: {reply.get('error')}")
        return reply

    async def _set(self, key: str, msg: dict[str, Any]) -> None:
        ch.parse_request(json.dumps(msg))  # validate here: the error names the caller's mistake
        await self._call(msg)
        self._replay[key] = msg

    async def set_node_id(self, node_id: str) -> None:
        await self._set("node_id", {"op": "set_node_id", "node_id": node_id})

    async def set_mtu(self, mtu: int) -> None:
        """Overlay MTU (frames the links carry without fragmenting): TCP MSS is clamped to fit."""
        await self._set("mtu", {"op": "set_mtu", "mtu": mtu})

    async def add_peer_port(self, port_name: str, peer_node_id: str) -> None:
        await self._set(f"port:{port_name}", {"op": "add_peer_port", "port": port_name, "peer": peer_node_id})

    async def remove_peer_port(self, port_name: str) -> None:
        self._replay.pop(f"port:{port_name}", None)
        await self._call({"op": "remove_peer_port", "port": port_name})

    async def add_local_port(self, port_name: str, *, dhcp_trusted: bool = False,
                             allowed_macs: list[str] | None = None) -> None:
        """A host-facing (guest) port. Unless ``dhcp_trusted``, DHCP server messages and IPv6
        router adverts from it are dropped in the datapath (one DHCP server per overlay: a
        libvirt/Docker bridge behind every node would otherwise answer everyone's guests).
        ``allowed_macs``: the only source MACs the port may send from (anti-spoofing); None = any.
        Calling it again for the same port replaces its settings. The LOCAL port is always trusted."""
        msg: dict[str, Any] = {"op": "add_local_port", "port": port_name, "dhcp_trusted": dhcp_trusted,
                               "allowed_macs": list(allowed_macs) if allowed_macs is not None else None}
        await self._set(f"port:{port_name}", msg)

    async def remove_local_port(self, port_name: str) -> None:
        self._replay.pop(f"port:{port_name}", None)
        await self._call({"op": "remove_local_port", "port": port_name})

    async def set_topology(self, edges: Iterable[tuple[str, str]]) -> None:
        """The overlay graph (every node's links) so floods reach nodes beyond the neighbours."""
        await self._set("topology", {"op": "set_topology", "edges": [list(e) for e in edges]})

    async def set_social(self, address: str, mac: str) -> None:
        """SocialVPN: our own social IPv4 address and the LOCAL port's MAC (frames from friends are
        rewritten to them)."""
        await self._set("social", {"op": "set_social", "address": address, "mac": mac})

    async def add_friend_port(self, port_name: str, peer_node_id: str, address: str) -> None:
        """A friend node's link port; ``address``: the address we assigned that node (its source
        addresses are rewritten to it, ARP for it answered). The app refuses an address in use."""
        await self._set(f"port:{port_name}", {"op": "add_friend_port", "port": port_name, "peer": peer_node_id,
                                              "address": address})

    async def remove_friend_port(self, port_name: str) -> None:
        self._replay.pop(f"port:{port_name}", None)
        await self._call({"op": "remove_friend_port", "port": port_name})

    async def counters(self) -> dict[str, int]:
        """The app's counters (switch_channel.COUNTERS) and OVS's ``packet_in_dropped``."""
        c = (await self._call({"op": "counters"}))["counters"]
        c["packet_in_dropped"] = await asyncio.to_thread(self._packet_in_dropped)
        return c

    async def flows(self) -> list[dict[str, Any]]:
        return (await self._call({"op": "flows"}))["flows"]

    async def macs(self) -> dict[str, dict[str, Any]]:
        return (await self._call({"op": "macs"}))["macs"]

    async def ports(self) -> dict[str, dict[str, Any]]:
        """Per local port (LOCAL under the bridge's name, and every guest port): ``ofport``,
        ``macs`` (stations learned behind it), ``rx_frames``/``rx_bytes`` (into the switch from
        the port) and ``tx_frames``/``tx_bytes`` (out of the switch to it) from OVS's port
        stats, ``drops`` {dhcp, ra, spoof, macs_refused}, ``dhcp_trusted``, ``allowed_macs``."""
        return (await self._call({"op": "ports"}))["ports"]

    async def owner_bytes(self) -> dict[str, int]:
        """Bytes forwarded towards each other node (by the owner of the destination MAC;
        transit included): what the topology's on-demand links are decided on."""
        return (await self._call({"op": "owner_bytes"}))["owners"]

    async def status(self) -> dict[str, Any]:
        return await self._call({"op": "status"})


def private_dir(path: Path) -> None:
    """``path`` as a directory only we can enter (0700, ours, not a symlink): the sockets in it
    are then out of other local users' reach whatever their own modes."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise SwitchAppError(f"{path} is not a directory of ours: refusing to put the switch sockets there")
    os.chmod(path, 0o700)
