"""``ipop-switch dns``: how to point this host's resolver at the overlay's DNS responder,
for the overlay's domain only. It prints commands; it never changes the host's resolver."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from pathlib import Path

import click

from ..config import Config, OverlayConfig, dns_loopback, load_config
from ..errors import IpopError

DEFAULT_CONFIG = "/etc/ipop-switch/node.toml"


def _addresses(ov: OverlayConfig) -> list[str]:
    out = []
    for x in ov.dns.listen:
        if x == "overlay" and ov.kind == "social":
            continue      # a social overlay's responder is never on the overlay address (agent/dns.py)
        if x == "overlay":
            out.append(str(ipaddress.ip_interface(ov.address).ip))
        elif x == "overlay6" and ov.address6:
            out.append(str(ipaddress.ip_interface(ov.address6).ip))
        elif x == "loopback":
            out.append(ov.dns.loopback or dns_loopback(ov.name))
        elif x not in ("overlay", "overlay6"):
            out.append(x)
    if not out and ov.kind == "social":
        out.append(ov.dns.loopback or dns_loopback(ov.name))
    return out


def advice(ov: OverlayConfig) -> dict:
    """What to run for one overlay: systemd-resolved (per link, routing domain only) and the
    resolv.conf case (which has no per-domain servers)."""
    social = ov.kind == "social"      # this node's view of its friends: <node>.<friend>.<social suffix>
    zone = ov.social.suffix if social else f"{ov.name}.{ov.dns.suffix}"
    addrs = _addresses(ov)
    overlay_ip = str(ipaddress.ip_interface(ov.address).ip)
    on_bridge = overlay_ip if "overlay" in ov.dns.listen and not social else None
    port = ov.dns.port
    resolved = []
    if on_bridge and port == 53:
        resolved = [f"resolvectl dns {ov.bridge} {on_bridge}", f"resolvectl domain {ov.bridge} '~{zone}'"]
    loop = next((a for a in addrs if ipaddress.ip_address(a).is_loopback), None)
    return {"overlay": ov.name, "zone": zone, "enabled": ov.dns.enable, "listen": [f"{a}:{port}" for a in addrs],
            "resolved": resolved, "dnsmasq": [f"server=/{zone}/{a}#{port}" for a in addrs[:1]],
            "namespace_resolv_conf": f"nameserver {loop or addrs[0]}" if port == 53 and addrs else None,
            "forward": ov.dns.forward,
            "names": [f"<node>.<friend>.{zone}"] if social else [f"<node>.{zone}", f"<guest>.<node>.{zone}"]}


def _print(a: dict) -> None:
    z = a["zone"]
    if not a["enabled"]:
        click.echo(f"overlay {a['overlay']}: DNS is off; turn it on in the node config:\n"
                   f"    [overlay.dns]\n    enable = true\n  then restart the agent (names: {a['names'][0]}).")
        return
    click.echo(f"overlay {a['overlay']}: names {' and '.join(a['names'])}, served on {', '.join(a['listen'])}")
    if a["resolved"]:
        click.echo("\n  systemd-resolved (only names under this domain go there; the rest of the host's "
                   "resolving is unchanged):")
        for c in a["resolved"]:
            click.echo(f"    {c}")
        click.echo("  (per-link settings go with the bridge: run them again after the agent restarts, e.g. from "
                   "an ExecStartPost= line, see docs/service.md)")
    elif a["names"][0].startswith("<node>.<friend>."):
        click.echo("\n  a social overlay's responder listens on loopback only (on the overlay address friends could "
                   "ask it who your other friends are): use a local forwarder, below.")
    else:
        click.echo("\n  systemd-resolved needs the responder on the overlay address, port 53 "
                   "([overlay.dns] listen = [\"overlay\", ...], port = 53).")
    click.echo("\n  resolv.conf has no per-domain servers, so do not put this responder there for the whole host;")
    click.echo("  a local forwarder such as dnsmasq can send just this domain to it:")
    for line in a["dnsmasq"]:
        click.echo(f"    {line}")
    if a["namespace_resolv_conf"]:
        click.echo("  a namespace or container of its own may use it as its only server "
                   f"(/etc/netns/<ns>/resolv.conf: '{a['namespace_resolv_conf']}')"
                   + ("; other names then go to the forward servers" if a["forward"]
                      else "; set [overlay.dns] forward = [\"ip\"] so other names still resolve"))


async def _check(a: dict) -> dict:
    from ..naming.dns import query
    host, _, port = a["listen"][0].rpartition(":")
    try:
        r = await query(host.strip("[]"), int(port), a["zone"], "SOA", timeout=2.0)
        return {"ok": r.header.rcode == 0, "rcode": r.header.rcode}
    except (OSError, asyncio.TimeoutError) as e:
        return {"ok": False, "error": str(e) or "no answer within 2 s"}


@click.command("dns")
@click.option("-c", "--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
              type=click.Path(dir_okay=False), help="node config (TOML)")
@click.option("--overlay", help="only this overlay")
@click.option("--check", is_flag=True, help="also ask the running responder for its zone (run where the agent runs)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def dns_cmd(config_path: str, overlay: str | None, check: bool, as_json: bool) -> None:
    """How to point systemd-resolved (or a forwarder) at the overlay's names, for its domain
    only. Prints commands; changes nothing on this host."""
    cfg: Config = load_config(Path(config_path))
    ovs = [o for o in cfg.overlay if overlay in (None, o.name)]
    if not ovs:
        raise IpopError(f"no overlay {overlay!r} in {config_path} ({', '.join(o.name for o in cfg.overlay)})")
    out = [advice(o) for o in ovs]
    if check:
        for a in out:
            if a["enabled"]:
                a["check"] = asyncio.run(_check(a))
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    for i, a in enumerate(out):
        if i:
            click.echo("")
        _print(a)
        if "check" in a:
            c = a["check"]
            click.echo(f"\n  check: {a['zone']} SOA from {a['listen'][0]}: "
                       + ("answered" if c["ok"] else f"FAILED ({c.get('error') or 'rcode ' + str(c.get('rcode'))})"))


COMMANDS = [dns_cmd]
