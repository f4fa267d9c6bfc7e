"""The ``ipop-switch`` command. Errors are one line and a non-zero exit, never a traceback.

The top of the house: it may import any part, and no part imports it.
``python -m ipop_switch.cli`` runs it too (``__main__.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
from rich.console import Console

from ..errors import IpopError

console = Console(width=None if sys.stdout.isatty() else 140)


class Main(click.Group):
    """Turns IpopError (and Ctrl-C) into one line on stderr and exit status 1 (130)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except IpopError as e:
            click.echo(f"ipop-switch: error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("ipop-switch: interrupted", err=True)
            sys.exit(130)


@click.group(cls=Main)
@click.version_option(package_name="ipop-switch")
def cli() -> None:
    """ipop-switch: a self-configuring peer-to-peer Layer-2 overlay."""


DEFAULT_CONFIG = "/etc/ipop-switch/node.toml"


# -- the agent -------------------------------------------------------------------
@cli.command()
@click.option("-c", "--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
              type=click.Path(dir_okay=False), help="node config (TOML)")
@click.option("--pidfile", type=click.Path(dir_okay=False), help="write the agent's pid here")
def up(config_path: str, pidfile: str | None) -> None:
    """Run the node: OVS, the OpenFlow app, signaling, links; until SIGTERM or Ctrl-C."""
    from ..config import load_config
    from ..proc import require_root

    load_config(config_path)               # errors here, in the CLI's words
    require_root()
    # the node runs as 'python -m ipop_switch.agent' in this same process (same pid): without
    # the CLI's imports (click, rich, every command's module), ~14 MB it would carry for life
    argv = [sys.executable, "-m", "ipop_switch.agent", "-c", config_path]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv + (["--pidfile", pidfile] if pidfile else []))


@cli.command()
@click.option("-c", "--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
              type=click.Path(dir_okay=False), help="node config (to find the agent's status socket)")
@click.option("--socket", "sock", type=click.Path(), help="the agent's status socket (instead of --config)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(config_path: str, sock: str | None, as_json: bool) -> None:
    """Per overlay and peer: state, path, RTT, traffic, drops, last handshake."""
    from ..render import render_status
    from ..status_client import query
    from ..config import load_config

    path = Path(sock) if sock else load_config(config_path).status_socket
    st = query(path)
    if as_json:
        click.echo(json.dumps(st, indent=1))
    else:
        render_status(st, console)


# -- lab -----------------------------------------------------------------------
@cli.group()
def lab() -> None:
    """A small internet with NATs in network namespaces, for tests, demos and benchmarks."""


def _spec(name, sites, nat, hosts, hairpin, cgnat, loss, udp_blocked, config, ip="v4"):
    from ..lab import LabSpec
    if config:
        return LabSpec.from_toml(Path(config), name=name)
    return LabSpec.from_flags(name=name, sites=sites, nat=nat, hosts=hosts, hairpin=hairpin,
                              cgnat=cgnat, loss=loss, udp_blocked=udp_blocked, ip=ip)


_lab_opts = [
    click.option("--name", default="lab", show_default=True, help="lab name (several labs can coexist)"),
    click.option("--sites", default=3, show_default=True, type=click.IntRange(1, 200)),
    click.option("--nat", default="none,easy,hard", show_default=True,
                 help="NAT kind per site, comma separated: none, one2one, easy, hard (the last repeats)"),
    click.option("--hosts", default=1, show_default=True, type=click.IntRange(1, 50), help="hosts per site"),
    click.option("--hairpin/--no-hairpin", default=False, help="NATs hairpin (LAN hosts reach each other's public mappings)"),
    click.option("--cgnat/--no-cgnat", default=False, help="a second, carrier-grade NAT in front of each NATed site"),
    click.option("--loss", default=0.0, show_default=True, type=click.FloatRange(0, 100), help="packet loss in percent at each site's edge"),
    click.option("--udp-blocked/--udp-allowed", default=False, help="no UDP in or out of the sites (TURN over TCP only)"),
    click.option("--ip", default="v4", show_default=True,
                 help="underlay per site, comma separated: v4, dual (IPv4 as --nat says, IPv6 routed), v6 (IPv6 only)"),
    click.option("-c", "--config", type=click.Path(dir_okay=False), help="lab topology TOML (overrides the flags)"),
]


def lab_options(f):
    for opt in reversed(_lab_opts):
        f = opt(f)
    return f


@lab.command("up")
@lab_options
@click.option("--json", "as_json", is_flag=True, help="print the lab's status as JSON (no stage lines)")
@click.option("--xmpp", type=click.Choice(["prosody", "ejabberd"]), default="prosody", show_default=True,
              help="the signaling server: one Prosody, or an ejabberd cluster (--xmpp-nodes)")
@click.option("--xmpp-nodes", type=click.IntRange(1, 4), default=2, show_default=True,
              help="with --xmpp ejabberd: nodes in the cluster (198.18.0.1, .4, .5, .6)")
def lab_up(as_json: bool, xmpp: str, xmpp_nodes: int, **kw) -> None:
    """Build the lab and start its services; it stays up until 'lab down'."""
    from ..lab import Lab
    from ..progress import spinner
    from ..render import render_lab
    t0 = time.monotonic()
    with spinner(Console(quiet=True) if as_json else console, "building the lab ..."):
        lab_ = Lab(_spec(**kw), tied=False, xmpp=xmpp, xmpp_nodes=xmpp_nodes if xmpp == "ejabberd" else 1).up()
    if as_json:
        click.echo(json.dumps({**lab_.status(), "up_s": round(time.monotonic() - t0, 1)}, indent=1))
        return
    console.print(f"lab [bold]{lab_.spec.name}[/] up in {time.monotonic() - t0:.1f}s")
    render_lab(lab_.status(), console)


@lab.command("down")
@click.option("--name", default="lab", show_default=True)
@click.option("--all", "all_", is_flag=True, help="every lab on this machine")
@click.option("--orphans", is_flag=True, help="the labs of test runs, demos and benches that were killed")
@click.option("--json", "as_json", is_flag=True, help="print what was removed as JSON (no stage lines)")
def lab_down(name: str, all_: bool, orphans: bool, as_json: bool) -> None:
    """Remove everything a lab made (also after a crash)."""
    from ..lab import destroy_lab, list_labs, orphaned_labs
    from ..progress import spinner
    from ..proc import require_root
    require_root()
    names = list_labs() if all_ else orphaned_labs() if orphans else [name]
    out = {}
    with spinner(Console(quiet=True) if as_json else console, f"removing {len(names)} lab(s) ..."):
        for n in names:
            removed = destroy_lab(n)
            out[n] = {"namespaces": len([r for r in removed if r.startswith("netns")]),
                      "processes": len([r for r in removed if r.startswith("pid")])}
            if not as_json:
                console.print(f"lab {n}: removed {out[n]['namespaces']} namespaces, {out[n]['processes']} processes",
                              highlight=False)
    if as_json:
        click.echo(json.dumps(out, indent=1))


@lab.command("status")
@click.option("--name", default="lab", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def lab_status(name: str, as_json: bool) -> None:
    """Hosts (LAN and public addresses, NAT kind) and services of a lab."""
    from ..lab import Lab
    from ..render import render_lab
    st = Lab.load(name).status()
    if as_json:
        click.echo(json.dumps(st, indent=1))
    else:
        render_lab(st, console)


@lab.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--name", default="lab", show_default=True)
@click.argument("host")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def lab_exec(name: str, host: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in HOST's namespace (a host, 'core', or a router such as 's2r')."""
    from ..lab import Lab
    ns = Lab.load(name).netns_of(host)
    rc = subprocess.call(["ip", "netns", "exec", ns, *command])
    sys.exit(rc)


@lab.command("demo")
@lab_options
@click.option("--keep", is_flag=True, help="leave the lab up afterwards")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="also write the demo's figures (first ping, links, pings, iperf3) as JSON to this file")
@click.option("--guests", default=2, show_default=True, type=click.IntRange(0, 20),
              help="container namespaces plugged into every node's overlay bridge (switch mode)")
def lab_demo(keep: bool, json_path: str | None, guests: int, **kw) -> None:
    """Bring a lab up, show what it is and how each NAT behaves, and tear it down."""
    from ..lab.demo import run_demo
    result = run_demo(_spec(**kw), console=console, keep=keep, guests=guests)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
    if not result.get("ok"):
        sys.exit(1)


@cli.command()
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1, 20), help="rounds (each system measured once per round)")
@click.option("--seconds", default=10.0, show_default=True, type=click.FloatRange(1, 120), help="length of each iperf3 run")
@click.option("--systems", default=None,
              help="comma list of underlay, wireguard-go, tinc, nebula, openvpn, n2n, ipop-switch, "
                   "'ipop-switch social' (default: all)")
@click.option("--social", is_flag=True, help="instead: only the SocialVPN path (with translation) beside the GroupVPN "
              "path between the same two sites, TCP and RTT (quick: no guests, flood or variants)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="also write the results as JSON to this file ('-': stdout)")
@click.option("--memory", is_flag=True, help="instead: memory of one node with 1, 8, 16 and 32 peers (33 nodes, minutes)")
@click.option("--one-peer", is_flag=True, help="with --memory: one node pair instead, RSS/PSS/USS per process")
@click.option("--fuzz", "fuzz_minutes", type=click.FloatRange(0.01, 24 * 60), default=None,
              help="instead: fuzz the C fast path under ASan/UBSan (libFuzzer) for this many minutes")
@click.option("--update", is_flag=True, help="with --fuzz: keep new inputs in tests/fuzz_corpus/ (minimised)")
@click.option("--faults", is_flag=True,
              help="instead: every single fault on one link (killed worker/agent, cut, restarts, roaming, NAT flush, loss): detect, recover, lost")
@click.option("--only", default=None, help="with --faults: comma list of scenario name parts (e.g. 'loss,turn')")
@click.option("--soak", "soak_minutes", type=click.FloatRange(1, 24 * 60), default=None,
              help="instead: 8 nodes for this many minutes (traffic, rekeys, cuts); RSS, fds, flows sampled")
@click.option("--idle", "idle_links", type=click.IntRange(1, 64), default=None, is_flag=False, flag_value=32,
              help="instead: CPU of one idle node with this many links (default 32), per process")
@click.option("--scale", "scale_nodes", type=click.IntRange(9, 64), default=None, is_flag=False, flag_value=32,
              help="instead: this many real nodes (default 32) in the structured overlay: convergence, idle CPU, RSS, on-demand")
@click.option("--latency", is_flag=True,
              help="instead: RTT of ipop-switch, n2n and the OVS floor (0/2/4 crossings), the stage-by-stage capture, idle CPU")
@click.option("--variants", default="", help="with --latency: comma list of variants A/B'd against the base "
              "(emc-always, emc-default, smc, threads-1, max-idle-60s, one-cpu, busy-poll-50us, no-halt)")
@click.option("--grid", is_flag=True, help="instead: every pair of NAT kinds: the path each ends on, time to first frame (--only: kinds)")
def bench(runs: int, seconds: float, systems: str | None, json_path: str | None, memory: bool, one_peer: bool,
          fuzz_minutes: float | None, update: bool, faults: bool, only: str | None,
          soak_minutes: float | None, idle_links: int | None, scale_nodes: int | None,
          latency: bool = False, variants: str = "", social: bool = False, grid: bool = False) -> None:
    """Measure ipop-switch beside the underlay, wireguard-go, tinc, nebula, OpenVPN and n2n, in one lab,
    interleaved; a peer that is not installed is skipped with a note."""
    if fuzz_minutes is not None:        # no lab, no root: a local build and one process
        out = console if json_path != "-" else Console(stderr=True)
        from ..bench.fuzz import print_report, run_fuzz
        report = run_fuzz(fuzz_minutes, update=update, console=out)
        print_report(report, out)
        if json_path == "-":
            click.echo(json.dumps(report, indent=1))
        elif json_path:
            Path(json_path).write_text(json.dumps(report, indent=1))
        sys.exit(1 if report["crashes"] else 0)
    from ..progress import json_console
    from ..proc import require_root
    require_root()
    out = json_console(console, json_path == "-")     # '--json -': tables and stage lines on stderr
    failed = False
    if grid:
        from ..bench.grid import print_grid, run_grid
        report = run_grid(console=out, only=only.split(",") if only else None)
        print_grid(report, out)
    elif faults:
        from ..bench.faults import print_faults, run_faults
        report = run_faults(console=out, only=only.split(",") if only else None)
        print_faults(report, out)
        failed = not report["ok"]
    elif soak_minutes is not None:
        from ..bench.soak import print_soak, run_soak
        report = run_soak(soak_minutes, console=out)
        print_soak(report, out)
        failed = not report["ok"]
    elif scale_nodes is not None:
        from ..bench.scale import run_scale
        report = run_scale(nodes=scale_nodes, console=out)
    elif latency:
        from ..bench.latency import print_latency, run_latency
        report = run_latency(console=out, rounds=runs, variants=tuple(v for v in variants.split(",") if v))
        print_latency(report, out)
    elif idle_links is not None:
        from ..bench.idle import run_idle
        report = run_idle(links=idle_links, console=out)
    elif memory and one_peer:
        from ..bench.memory import run_footprint
        report = {"footprint": run_footprint(console=out)}
    elif memory:
        from ..bench.memory import run_memory
        report = {"memory": run_memory(console=out)}
    else:
        from ..bench.run import PEERS, print_table, run_bench
        from ..bench import systems as extra
        if social:
            report = run_bench(systems=["ipop-switch", "ipop-switch social"], runs=runs, seconds=seconds, console=out,
                               extra_systems=extra.available(), variants=(), guests=False, flood=False)
        else:
            names = systems.split(",") if systems else [*PEERS, *extra.available()]
            report = run_bench(systems=names, runs=runs, seconds=seconds, console=out, extra_systems=extra.available())
        print_table(report, out)
    if json_path == "-":
        click.echo(json.dumps(report, indent=1))
    elif json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    if failed:
        sys.exit(1)


@cli.group()
def deploy() -> None:
    """Generate configs for a group across real machines."""


@deploy.command("vagrant")
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 50))
@click.option("--signal-ip", required=True, help="underlay address of the signaling host (Prosody, coturn)")
@click.option("--node-ips", required=True, help="comma list of the nodes' underlay addresses")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output directory")
@click.option("--group", default="demo", show_default=True)
@click.option("--guests", default=1, show_default=True, type=click.IntRange(0, 254),
              help="network namespaces per node on its overlay bridge ([[overlay.attach]])")
def deploy_vagrant(nodes: int, signal_ip: str, node_ips: str, out: str, group: str, guests: int) -> None:
    """Signaling host configs and, per node, identity + certificate + node.toml (used by vagrant/)."""
    from ..deploy import generate
    ips = [x for x in node_ips.split(",") if x]
    if len(ips) != nodes:
        raise IpopError(f"--node-ips: {len(ips)} addresses for {nodes} nodes")
    summary = generate(Path(out), nodes=nodes, signal_ip=signal_ip, node_ips=ips, group=group, guests=guests)
    click.echo(json.dumps(summary, indent=1))


# -- commands defined in other modules: one import + add_command line each -------------
# (keep this block at the end; each part owns its own cli module)
from .identity import COMMANDS as _identity_commands  # noqa: E402
from .guests import COMMANDS as _guest_commands  # noqa: E402
from .sim import COMMANDS as _sim_commands  # noqa: E402
from .dns import COMMANDS as _dns_commands  # noqa: E402
from .service import COMMANDS as _service_commands  # noqa: E402
from .friends import COMMANDS as _friends_commands  # noqa: E402
for _c in [*_identity_commands, *_guest_commands, *_sim_commands, *_dns_commands, *_service_commands,
           *_friends_commands]:
    cli.add_command(_c)


def main() -> None:
    cli(prog_name="ipop-switch")

