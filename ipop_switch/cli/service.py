"""``ipop-switch service install|uninstall``: the agent as a systemd service.

The unit runs ``ipop-switch up -c CONFIG`` as root with only the capabilities the agent
uses (docs/service.md explains each line):

- CAP_NET_ADMIN: bridges, TAPs, veths, addresses, OVS datapaths;
- CAP_NET_RAW: OVS's userspace datapath reads ports through packet sockets;
- CAP_SYS_ADMIN: entering a guest's network namespace (``nsenter --net``, setns);
- CAP_SYS_PTRACE: opening /proc/PID/ns/net of a container given by PID (``pid =`` guests);
- CAP_NET_BIND_SERVICE: the DNS responder on port 53.
The file system is read-only but the state directory (ProtectSystem=strict), /dev holds
only the usual pseudo devices and /dev/net/tun; /proc/sys stays writable (the agent sets
per-interface sysctls on its TAPs and bridge), so ProtectKernelTunables is not set.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click

from ..config import Config, load_config
from ..errors import IpopError

DEFAULT_CONFIG = "/etc/ipop-switch/node.toml"
UNIT_DIR = Path("/etc/systemd/system")
UNIT_NAME = "ipop-switch.service"
CAPABILITIES = ("CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_NET_BIND_SERVICE")
HOME_DIRS = ("/home", "/root", "/run/user")


def render_unit(config: Path, cfg: Config | None, python: str | None = None) -> str:
    """The unit's text for this config (its state directory, OVS mode) and interpreter."""
    python = python or sys.executable
    config = Path(config).absolute()
    state = cfg.node.state_dir if cfg else Path("/run/ipop-switch")
    rw = [str(state)]
    if cfg and cfg.ovs.rundir:
        rw.append(str(cfg.ovs.rundir))
    after = "network-online.target"
    wants = "network-online.target"
    if cfg and cfg.ovs.mode == "system":
        after += " ovs-vswitchd.service openvswitch-switch.service"     # connecting to its socket needs no write access
    # a venv (or a config) under a home directory must stay readable
    home = "read-only" if any(str(p).startswith(HOME_DIRS) for p in (python, config)) else "yes"
    runtime = "RuntimeDirectory=ipop-switch\nRuntimeDirectoryMode=0700\n" if str(state) == "/run/ipop-switch" else ""
    return f"""# written by 'ipop-switch service install' (docs/service.md)
[Unit]
Description=ipop-switch overlay node ({config})
After={after}
Wants={wants}

[Service]
Type=simple
ExecStart={python} -m ipop_switch.cli up -c {config}
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM to the agent only: it stops its links, OVS and the switch app itself
KillMode=mixed
TimeoutStopSec=40
Restart=on-failure
RestartSec=5
{runtime}
# only what the agent uses (docs/service.md)
CapabilityBoundingSet={' '.join(CAPABILITIES)}
AmbientCapabilities=
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={' '.join(rw)}
ProtectHome={home}
PrivateTmp=yes
DevicePolicy=closed
DeviceAllow=/dev/net/tun rw
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def _systemctl(unit_dir: Path, *args: str) -> bool:
    """systemctl, when the unit went where systemd reads it and systemd runs this host
    (False: not run)."""
    if Path(unit_dir).absolute() == UNIT_DIR and shutil.which("systemctl") and Path("/run/systemd/system").is_dir():
        r = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise IpopError(f"systemctl {' '.join(args)}: {r.stderr.strip() or r.returncode}")
        return True
    return False


@click.group("service")
def service_cmd() -> None:
    """Run the agent as a systemd service (install, uninstall)."""


@service_cmd.command("install")
@click.option("-c", "--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
              type=click.Path(dir_okay=False), help="node config the service runs")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path), default=UNIT_DIR, show_default=True)
@click.option("--print", "--dry-run", "dry", is_flag=True, help="print the unit instead of writing it")
@click.option("--enable/--no-enable", default=True, show_default=True, help="systemctl enable --now after writing")
def install_cmd(config_path: str, unit_dir: Path, dry: bool, enable: bool) -> None:
    """Write the unit (hardened: only the capabilities the agent needs), reload systemd, enable it."""
    cfg = load_config(config_path)       # a config that 'up' would refuse is refused here
    text = render_unit(Path(config_path), cfg)
    if dry:
        click.echo(text, nl=False)
        return
    from ..proc import require_root
    require_root()
    path = unit_dir / UNIT_NAME
    unit_dir.mkdir(parents=True, exist_ok=True)
    if str(cfg.node.state_dir) != "/run/ipop-switch":
        cfg.node.state_dir.mkdir(parents=True, exist_ok=True)     # ReadWritePaths= must exist at start
    path.write_text(text)
    path.chmod(0o644)
    click.echo(f"wrote {path}")
    ran = _systemctl(unit_dir, "daemon-reload")
    if enable and ran:
        _systemctl(unit_dir, "enable", "--now", UNIT_NAME)
        click.echo(f"enabled and started {UNIT_NAME}: 'journalctl -u ipop-switch -f' for its log, "
                   "'systemctl reload ipop-switch' after editing the config")
    elif enable:
        click.echo(f"systemd was not told (not running here, or another --unit-dir): "
                   f"'systemctl daemon-reload && systemctl enable --now {UNIT_NAME}' where it runs")


@service_cmd.command("uninstall")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path), default=UNIT_DIR, show_default=True)
def uninstall_cmd(unit_dir: Path) -> None:
    """Stop and disable the service and remove its unit (identity and config stay)."""
    from ..proc import require_root
    require_root()
    path = unit_dir / UNIT_NAME
    if not path.exists():
        raise IpopError(f"{path}: not installed")
    _systemctl(unit_dir, "disable", "--now", UNIT_NAME)
    path.unlink()
    _systemctl(unit_dir, "daemon-reload")
    click.echo(f"removed {path}")


COMMANDS = [service_cmd]
