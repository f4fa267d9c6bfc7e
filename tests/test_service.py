"""Running as a service, without the lab: the systemd unit (its hardening, and
``systemd-analyze verify`` where systemd's tools are installed), ``service install/uninstall``
into a directory of the test, the agent's one-line log records (journald's form when
$JOURNAL_STREAM names stderr), what a SIGHUP applies live and what needs a restart, and
``ipop-switch dns``'s advice."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ipop_switch.agent.logs import setup_logging, under_journald
from ipop_switch.agent.reload import plan
from ipop_switch.cli.service import CAPABILITIES, render_unit
from ipop_switch.config import Config, load_config

CONFIG = """
[node]
state_dir = "{state}"
log_level = "info"

[[overlay]]
name = "demo"
address = "100.99.0.1/16"
address6 = "fd00:99::1/64"

[overlay.xmpp]
server = "198.18.0.1"
jid = "a@x"
password = "p"
{extra}
"""


def write_cfg(tmp_path: Path, extra: str = "", name: str = "node.toml", **kw) -> Path:
    p = tmp_path / name
    p.write_text(CONFIG.format(state=kw.get("state", tmp_path / "state"), extra=extra))
    return p


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ipop_switch.cli", *args], capture_output=True, text=True, timeout=60)


# -- the unit ------------------------------------------------------------------------------
def test_unit_hardening(tmp_path):
    cfg_path = write_cfg(tmp_path)
    text = render_unit(cfg_path, load_config(cfg_path), python="/usr/bin/python3")
    lines = text.splitlines()
    assert f"ExecStart=/usr/bin/python3 -m ipop_switch.cli up -c {cfg_path}" in lines
    assert "ExecReload=/bin/kill -HUP $MAINPID" in lines
    assert f"CapabilityBoundingSet={' '.join(CAPABILITIES)}" in lines
    assert set(CAPABILITIES) == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_NET_BIND_SERVICE"}
    for want in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                 "DevicePolicy=closed", "DeviceAllow=/dev/net/tun rw", f"ReadWritePaths={tmp_path / 'state'}",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET", "KillMode=mixed"):
        assert want in lines, want
    # the agent writes per-interface sysctls: /proc/sys must stay writable
    assert not any(l.startswith("ProtectKernelTunables") for l in lines)
    # the default state directory is systemd's runtime directory; a venv in /root stays readable
    default = render_unit(Path("/etc/ipop-switch/node.toml"), None, python="/root/venv/bin/python")
    assert "RuntimeDirectory=ipop-switch" in default and "ProtectHome=read-only" in default


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package 'systemd'); the unit is not verified")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    cfg_path = write_cfg(tmp_path)
    unit = tmp_path / "ipop-switch.service"
    unit.write_text(render_unit(cfg_path, load_config(cfg_path)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # unknown keys and bad values are warnings with status 0: none may appear for our unit
    ours = [l for l in r.stderr.splitlines() if str(unit) in l]
    assert not ours, r.stderr


def test_install_print_write_uninstall(tmp_path):
    cfg_path = write_cfg(tmp_path)
    r = cli("service", "install", "-c", str(cfg_path), "--print")
    assert r.returncode == 0 and "[Service]" in r.stdout and f"up -c {cfg_path}" in r.stdout, r.stderr
    units = tmp_path / "units"
    r = cli("service", "install", "-c", str(cfg_path), "--unit-dir", str(units), "--no-enable")
    assert r.returncode == 0, r.stderr
    assert (units / "ipop-switch.service").read_text().startswith("# written by 'ipop-switch service install'")
    assert (tmp_path / "state").is_dir()
    r = cli("service", "uninstall", "--unit-dir", str(units))
    assert r.returncode == 0 and not (units / "ipop-switch.service").exists(), r.stderr
    r = cli("service", "uninstall", "--unit-dir", str(units))
    assert r.returncode == 1 and r.stderr.strip().endswith("not installed") and "Traceback" not in r.stderr
    # a config 'up' would refuse is refused here, in one line
    bad = write_cfg(tmp_path, "[overlay.dns]\nenable = true\nport = 0\n", name="bad.toml")
    r = cli("service", "install", "-c", str(bad), "--print")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "dns.port" in r.stderr, r.stderr


# -- logs ------------------------------------------------------------------------------------
@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_log_records_are_one_line(tmp_path, restore_logging, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = tmp_path / "log"
    with out.open("w") as f:
        setup_logging("info", stream=f)
        log = logging.getLogger("ipop_switch.agent")
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("event=overlay_event_failed overlay=%s", "demo")
        log.info("event=node_up node=%s", "x")
        log.debug("event=hidden")
    lines = out.read_text().splitlines()
    assert len(lines) == 2, lines
    assert "event=overlay_event_failed overlay=demo" in lines[0] and "Traceback" in lines[0] and "\\n" in lines[0]
    assert lines[1][:4].isdigit()          # a timestamp first, outside journald


def test_journald_lines_have_priority_and_no_timestamp(tmp_path, restore_logging, monkeypatch):
    out = tmp_path / "log"
    with out.open("w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert under_journald(f)
        setup_logging("info", stream=f)
        logging.getLogger("ipop_switch.agent").warning("event=restart_needed changed=x")
    assert out.read_text() == "<4>WARNING ipop_switch.agent event=restart_needed changed=x\n"
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    with out.open("w") as f:
        assert not under_journald(f)


# -- reload: what applies live -----------------------------------------------------------------
def test_reload_plan(tmp_path):
    old = load_config(write_cfg(tmp_path))
    d = old.to_dict()
    d["node"]["log_level"] = "debug"
    d["overlay"][0]["attach"] = [{"name": "web", "netns": "x", "addresses": ["100.99.1.1/16"]}]
    d["overlay"][0]["address"] = "100.99.0.2/16"
    d["overlay"][0]["dns"]["enable"] = True
    d["ovs"]["datapath"] = "netdev"
    d["overlay"].append({**d["overlay"][0], "name": "other", "attach": []})
    new = Config.parse(d)
    live, restart = plan(old, new)
    assert live == ["node.log_level", "overlay[demo].attach", "overlay[demo].dns"]
    assert restart == ["ovs", "overlay[other]:added", "overlay[demo].address"]
    d["overlay"][0]["dns"]["name"] = "laptop"
    assert plan(old, Config.parse(d))[1][-1] == "overlay[demo].dns.name"
    assert plan(old, old) == ([], [])


# -- ipop-switch dns ---------------------------------------------------------------------------
def test_dns_command_advice(tmp_path):
    off = write_cfg(tmp_path)
    r = cli("dns", "-c", str(off))
    assert r.returncode == 0 and "DNS is off" in r.stdout and "enable = true" in r.stdout, r.stderr
    on = write_cfg(tmp_path, "[overlay.dns]\nenable = true\n", name="on.toml")
    r = cli("dns", "-c", str(on), "--json")
    assert r.returncode == 0, r.stderr
    a = json.loads(r.stdout)[0]
    assert a["zone"] == "demo.ipsw.internal"
    assert a["resolved"] == ["resolvectl dns ipswdemo 100.99.0.1", "resolvectl domain ipswdemo '~demo.ipsw.internal'"]
    assert a["listen"][0] == "100.99.0.1:53" and a["listen"][1].startswith("127.53.")
    r = cli("dns", "-c", str(on))
    assert "resolvectl domain ipswdemo '~demo.ipsw.internal'" in r.stdout and "dnsmasq" in r.stdout
    r = cli("dns", "-c", str(on), "--overlay", "nope")
    assert r.returncode == 1 and "no overlay 'nope'" in r.stderr
