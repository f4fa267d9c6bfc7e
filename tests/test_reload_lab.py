"""SIGHUP under a real agent (ipop-switch up) in the lab: a guest added to the config's
[[overlay.attach]] appears (and is reachable over the bridge), removed it disappears; a
changed address is not applied and one log line says it needs a restart; a broken config
is refused in one line and the node runs on."""

from __future__ import annotations

import os
import signal
import tomllib

import pytest

from conftest import unique_name
from helpers.agent_lab import logs_on_failure, until
from ipop_switch.config_writer import write_config
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.lab.nodes import LabGroup
from ipop_switch.status_client import query

pytestmark = [pytest.mark.lab]

HOST = "ah1"
GUEST_ADDR = "100.92.5.1"


@pytest.fixture(scope="module")
def one():
    lab = Lab(LabSpec(name=unique_name("h"), sites=(SiteSpec("a", "none"),)))
    group = None
    try:
        lab.up()
        group = LabGroup(lab, "rl", net=92)
        node = group.add(HOST)
        group.start(HOST)
        until(lambda: "event=node_up" in _log(node), 60, "the agent up (its node_up line)")
        yield lab, group, node
    finally:
        if group:
            group.stop_all()
        lab.down()


def _status(node) -> dict | None:
    try:
        return query(node.status_socket)
    except Exception:
        return None


def _edit(node, change) -> None:
    doc = tomllib.loads(node.config.read_text())
    change(doc)
    write_config(node.config, doc, header="written by the ipop-switch lab; edited by test_reload_lab")


def _hup(node) -> None:
    os.kill(int((node.dir / "agent.pid").read_text()), signal.SIGHUP)


def _log(node) -> str:
    return (node.dir / "agent.log").read_text()


def _guests(node) -> list[str]:
    st = _status(node) or {"overlays": [{"guests": []}]}
    return [g["name"] for g in st["overlays"][0]["guests"]]


def test_attach_and_detach_on_sighup(one):
    lab, g, node = one
    with logs_on_failure(g):
        _attach_detach(lab, node)


def _attach_detach(lab, node) -> None:
    ns = lab.add_namespace(f"{HOST}g1")
    _edit(node, lambda d: d["overlay"][0].__setitem__("attach", [{"name": "g1", "netns": ns,
                                                                   "addresses": [f"{GUEST_ADDR}/16"]}]))
    _hup(node)
    until(lambda: "g1" in _guests(node), 20, "the guest attached after SIGHUP")
    r = lab.exec(HOST, ["ping", "-c", "2", "-i", "0.2", "-W", "2", GUEST_ADDR], check=False, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "event=config_reloaded" in _log(node) and "applied=overlay[rl].attach" in _log(node)
    _edit(node, lambda d: d["overlay"][0].pop("attach"))
    _hup(node)
    until(lambda: "g1" not in _guests(node), 20, "the guest detached after SIGHUP")
    r = lab.exec(HOST, ["ip", "link", "show"], timeout=10)
    assert "g1" not in r.stdout.replace(ns, "")


def test_what_needs_a_restart_is_named_and_a_bad_config_refused(one):
    lab, g, node = one
    orig = node.config.read_text()
    try:
        with logs_on_failure(g):
            _restart_and_refused(node)
    finally:
        node.config.write_text(orig)


def _restart_and_refused(node) -> None:
    _edit(node, lambda d: (d["overlay"][0].__setitem__("address", "100.92.0.77/16"),
                           d["node"].__setitem__("log_level", "debug")))
    _hup(node)
    until(lambda: "event=restart_needed" in _log(node), 20, "the restart_needed line")
    line = next(l for l in _log(node).splitlines() if "event=restart_needed" in l)
    assert "overlay[rl].address" in line and "log_level" not in line, line
    assert "applied=node.log_level" in _log(node)
    st = _status(node)
    assert st["overlays"][0]["address"] == "100.92.0.1/16"        # not applied
    node.config.write_text("[[overlay]]\nname = 5\n")
    _hup(node)
    until(lambda: "event=reload_failed" in _log(node), 20, "the reload_failed line")
    failed = [l for l in _log(node).splitlines() if "event=reload_failed" in l]
    assert len(failed) == 1 and "the running config stays" in failed[0], failed
    assert _status(node) is not None                              # still running


def test_dns_turned_on_and_off_live(one):
    import json

    from conftest import helper
    from ipop_switch.config import dns_loopback
    lab, g, node = one
    orig = node.config.read_text()
    try:
        with logs_on_failure(g):
            _edit(node, lambda d: d["overlay"][0].__setitem__("dns", {"enable": True}))
            _hup(node)
            until(lambda: (_status(node) or {}).get("overlays", [{}])[0].get("dns"), 20, "the responder after SIGHUP")
            r = lab.exec(HOST, [*helper("dns_ask"), dns_loopback("rl"), "53", f"{HOST}.rl.ipsw.internal"],
                         check=False, timeout=20)
            assert r.returncode == 0, r.stderr
            assert [a["data"] for a in json.loads(r.stdout)["answers"]] == [node.ip]
            node.config.write_text(orig)
            _hup(node)
            until(lambda: (_status(node) or {"overlays": [{"dns": 1}]})["overlays"][0].get("dns") is None, 20,
                  "the responder gone after SIGHUP")
    finally:
        node.config.write_text(orig)
