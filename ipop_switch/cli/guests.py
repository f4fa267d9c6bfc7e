"""The guest commands: ``ipop-switch attach`` and ``detach``, sent to the running agent
(the change is applied at once, links untouched; for guests kept across restarts, put them
in the node config as ``[[overlay.attach]]``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

DEFAULT_CONFIG = "/etc/ipop-switch/node.toml"

_config = click.option("-c", "--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
                       type=click.Path(dir_okay=False), help="node config (to find the agent)")
_socket = click.option("--socket", "sock", type=click.Path(), help="the agent's status socket (instead of --config)")
_overlay = click.option("--overlay", default=None, help="which overlay (needed when the node has several)")
_json = click.option("--json", "as_json", is_flag=True, help="print the agent's answer as JSON")


def _send(config_path: str, sock: str | None, cmd: dict) -> dict:
    from ..config import load_config
    from ..status_client import command
    path = Path(sock) if sock else load_config(config_path).status_socket
    return command(path, cmd)


@click.command("attach")
@_config
@_socket
@_overlay
@click.argument("name")
@click.option("--netns", help="a network namespace: its name (ip netns) or path (/proc/PID/ns/net)")
@click.option("--pid", type=int, help="a process in the namespace: a Docker/Podman container's PID")
@click.option("--interface", help="an existing interface, added as it is: a VM's TAP (vnetN), a NIC, a veth into a Linux bridge")
@click.option("--ifname", default="eth0", show_default=True, help="the guest interface's name inside the namespace")
@click.option("--mac", help="the guest's MAC (default: random, locally administered)")
@click.option("--mtu", type=int, help="default: the overlay's MTU")
@click.option("--address", "addresses", multiple=True, help="a static address inside the namespace, CIDR (repeatable)")
@click.option("--dhcp-server", is_flag=True, help="this guest is the overlay's DHCP server (others' offers are dropped)")
@click.option("--lock-mac", is_flag=True, help="the guest may only send from its own MAC")
@click.option("--moved", is_flag=True, help="the guest moved here from another node with its MAC (a migrated VM, "
              "a re-created container): its MAC still known there is not a conflict")
@_json
def attach(config_path, sock, overlay, name, netns, pid, interface, ifname, mac, mtu, addresses,
           dhcp_server, lock_mac, moved, as_json) -> None:
    """Plug a guest into the overlay's bridge: a namespace or container (a veth pair, one end
    inside) or an existing interface."""
    guest = {"name": name, "netns": netns, "pid": pid, "interface": interface, "ifname": ifname, "mac": mac,
             "mtu": mtu, "addresses": list(addresses), "dhcp_server": dhcp_server, "lock_mac": lock_mac,
             "moved": moved or None}
    ans = _send(config_path, sock, {"cmd": "attach", "overlay": overlay,
                                    "guest": {k: v for k, v in guest.items() if v is not None}})
    if as_json:
        click.echo(json.dumps(ans, indent=1))
        return
    g = ans["guest"]
    click.echo(f"attached {g['name']} ({g['where']}) to overlay {ans['overlay']}: port {g['port']}"
               f"{', MAC ' + g['mac'] if g.get('mac') else ''}{', MTU ' + str(g['mtu']) if g.get('mtu') else ''}")
    for note in g.get("notes") or []:
        click.echo(f"note: {note}")


@click.command("detach")
@_config
@_socket
@_overlay
@click.argument("name")
@_json
def detach(config_path, sock, overlay, name, as_json) -> None:
    """Unplug a guest: its port and the flows learned through it go (a namespace's veth is
    deleted; an existing interface is only taken off the bridge)."""
    ans = _send(config_path, sock, {"cmd": "detach", "overlay": overlay, "name": name})
    if as_json:
        click.echo(json.dumps(ans, indent=1))
    else:
        click.echo(f"detached {ans['guest']['name']} from overlay {ans['overlay']}")


COMMANDS = [attach, detach]
