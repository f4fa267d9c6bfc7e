"""Signaling against the lab's real Prosody: 5 members of one group behind none/easy/hard NATs
discover each other with verified certificates; bad certificates and a hostile client are
dropped and counted; a Prosody restart is survived. One lab and one group of 5 running nodes
for the module; each test leaves the 5 nodes as it found them (what a test adds, it stops),
so any test runs alone or in any order."""

from __future__ import annotations

import json
import secrets
import shutil
import sys
import time
from pathlib import Path

import pytest

from conftest import helper, unique_name
from helpers.signaling_nodes import expired_window, make_member, start_node
from helpers.wait import wait_until
from ipop_switch.identity import GroupCA, NodeIdentity
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.lab.services import XMPP_ADDR, make_lab_ca

pytestmark = pytest.mark.lab

OVERLAY = "blue"
DISCOVERY_BOUND = 10.0   # seconds for 5 nodes to see each other
REDISCOVERY_BOUND = 15.0  # after a Prosody restart
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("sig")
    spec = LabSpec(name=unique_name("g"), sites=(SiteSpec("pub", "none", hosts=2), SiteSpec("easy", "easy", hosts=2),
                                                SiteSpec("hard", "hard")))
    lab = Lab(spec)
    nodes = []
    try:
        lab.up()
        ca = GroupCA.create(d / "ca", OVERLAY)
        hosts = list(lab.hosts)
        for h in hosts:
            make_member(ca, d / h, h)
        t0 = time.time()
        for h in hosts:
            nodes.append(start_node(lab, h, d / h, OVERLAY, d))
        # discovery is the group's start: seen here, checked by its test (whatever runs first)
        try:
            last = _all_see_each_other(nodes, DISCOVERY_BOUND)
            discovery = {"last": last, "status": [n.status() for n in nodes]}
        except AssertionError as e:
            discovery = {"error": str(e)}
        yield {"lab": lab, "ca": ca, "dir": d, "nodes": nodes, "t0": t0, "discovery": discovery}
    finally:
        for n in nodes:
            n.stop()
        lab.down()
        if MEASURED:
            print(f"\nsignaling measurements: {json.dumps(MEASURED)}", file=sys.stderr)


def _all_see_each_other(nodes, timeout: float, since: dict | None = None) -> float:
    """Wait until every node knows every other; returns the wall time of the last needed event."""
    last = 0.0
    for n in nodes:
        want = {m.node_id for m in nodes if m is not n}
        for nid in want:
            line = n.wait_for(lambda l, nid=nid: l["event"] in ("appeared", "refreshed", "changed")
                              and l["node_id"] == nid and l["t"] >= (since or {}).get(n.name, 0), timeout,
                              f"announce of {nid}")
            last = max(last, line["t"])
        assert want <= n.peers(), (n.name, want - n.peers())
    return last


@pytest.fixture(scope="module")
def bad_members(world) -> dict[str, Path]:
    """Identities the group must refuse: a certificate of another CA with the same group name,
    an expired one, a revoked one (the CRL given to the running members)."""
    d, ca, nodes = world["dir"], world["ca"], world["nodes"]
    other = GroupCA.create(d / "other-ca", OVERLAY)
    make_member(other, d / "foreign", "foreign")
    make_member(ca, d / "expired", "expired", **expired_window())
    revoked = make_member(ca, d / "revoked", "revoked")
    ca.revoke(revoked.node_id)
    give_crl(world, nodes)
    return {"untrusted_cert": d / "foreign", "expired": d / "expired", "revoked": d / "revoked"}


def give_crl(world, nodes) -> None:
    """The group CA's current CRL to these members (they re-read it on change)."""
    for n in nodes:
        shutil.copy(world["ca"].dir / "crl.pem", world["dir"] / n.name.split("-")[0] / "groups" / OVERLAY / "crl.pem")


def test_five_nodes_discover_each_other_with_verified_certificates(world):
    nodes, disc = world["nodes"], world["discovery"]
    assert "error" not in disc, disc.get("error")
    last = disc["last"]
    MEASURED["discovery_5_nodes_s"] = round(last - world["t0"], 3)
    assert last - world["t0"] < DISCOVERY_BOUND
    subjects = {n.node_id: f"UID={n.node_id},CN={n.name.split('-')[0]}" for n in nodes}
    for n, st in zip(nodes, disc["status"]):
        assert st["online"] and st["drops"] == {}, st
        assert {p["node_id"]: p["subject"] for p in st["peers"]} == {k: v for k, v in subjects.items() if k != n.node_id}
        assert all(p["reachable"] and len(p["fingerprint"]) == 79 for p in st["peers"])


def test_messages_are_delivered_and_queued_for_a_bounded_time(world):
    lab, d, nodes = world["lab"], world["dir"], world["nodes"]
    a, b = nodes[0], nodes[4]
    a.command(cmd="send", to=b.node_id, type="link_offer", payload={"link_id": "l1", "attempt": 1, "ufrag": "u",
                                                                    "pwd": "p", "candidates": ["c1"]})
    got = b.wait_for(lambda l: l["event"] == "message" and l["type"] == "link_offer", 5, "link_offer")
    assert got["node_id"] == a.node_id and got["payload"]["candidates"] == ["c1"]
    # to a node that does not exist: reported failed after the queue bound (3 s in these tests)
    ghost = secrets.token_hex(16)
    t = time.time()
    a.command(cmd="send", to=ghost, type="link_close", payload={"link_id": "x", "attempt": 1, "reason": "r"})
    fail = a.wait_for(lambda l: l["event"] == "send_failed" and l["node_id"] == ghost, 8, "send_failed")
    assert 2.0 <= fail["t"] - t <= 6.0
    # to a member that starts later (within the bound): queued, then delivered
    ca = world["ca"]
    make_member(ca, d / "late", "late")
    from ipop_switch.identity import NodeIdentity
    late_id = NodeIdentity.load(d / "late").node_id
    a.command(cmd="send", to=late_id, type="link_offer", payload={"link_id": "l2", "attempt": 1, "ufrag": "u",
                                                                  "pwd": "p", "candidates": []})
    pw = lab.add_account("late")
    late = start_node(lab, "pubh2", d / "late", OVERLAY, d, user="late", password=pw, name="late")
    try:
        got = late.wait_for(lambda l: l["event"] == "message" and l["type"] == "link_offer", 5, "queued message")
        assert got["node_id"] == a.node_id and got["payload"]["link_id"] == "l2"
    finally:
        late.stop()
    left = a.wait_for(lambda l: l["event"] == "left" and l["node_id"] == late_id, 5, "late node left")
    assert left["reason"] == "left"


def test_bad_certificates_are_not_accepted(world, bad_members):
    lab, d, nodes = world["lab"], world["dir"], world["nodes"]
    before = {n.name: n.status()["drops"] for n in nodes}
    bad = []
    try:
        for reason in ("untrusted_cert", "expired", "revoked"):
            name = bad_members[reason].name
            pw = lab.add_account(name)
            bad.append(start_node(lab, "easyh1", bad_members[reason], OVERLAY, d, user=name, password=pw, name=name,
                                  extra=["--no-self-check"]))
        for b in bad:
            b.wait_for(lambda l: l["event"] == "online", 10, "online")
        want = ("untrusted_cert", "expired", "revoked")       # each announce dropped, for its reason
        for n in nodes:
            def dropped() -> dict | None:
                drops = n.status()["drops"]
                return drops if all(drops.get(k, 0) > before[n.name].get(k, 0) for k in want) else None
            try:
                wait_until(dropped, 10, "the three bad announces dropped", interval=0.2)
            except AssertionError as e:
                raise AssertionError(f"{n.name}: {e}: {before[n.name]} -> {n.status()['drops']}") from None
            assert n.peers() == {m.node_id for m in nodes if m is not n}, n.name
            assert not ({b.node_id for b in bad} & {p["node_id"] for p in n.status()["peers"]})
        # the foreign node, for its part, trusts none of the group
        assert bad[0].peers() == set()
    finally:
        for b in bad:
            b.stop()


def test_hostile_client_messages_are_dropped_and_counted(world, bad_members):
    lab, d, nodes = world["lab"], world["dir"], world["nodes"]
    target, captured, other = nodes[0], nodes[1], nodes[2]
    host = lab.host(target.name.split("-")[0])
    user = "mallory"
    pw = lab.add_account(user)
    conf = {"jid": f"{user}@ipsw.test", "password": pw, "server": XMPP_ADDR, "ca": str(lab.ca_cert),
            "room": f"ipsw-{OVERLAY}@conference.ipsw.test", "overlay": OVERLAY, "target": target.node_id,
            "target_jid": f"{host.xmpp_user}@ipsw.test", "captured": str(d / captured.name.split("-")[0]),
            "other_member": other.node_id,
            "target_tunnel": NodeIdentity.load(d / target.name.split("-")[0]).tunnel_public().hex(),
            "bad_certs": {k: str(v) for k, v in bad_members.items()}}
    (d / "hostile.json").write_text(json.dumps(conf))
    before = target.status()["drops"]
    target.drain()
    mark = len(target.lines)
    res = json.loads(lab.exec("hardh1", helper("signaling_hostile") + [str(d / "hostile.json")], timeout=60).stdout)
    assert "error" not in res, res
    expected = res["sent"]
    assert set(expected) >= {"replayed", "stale", "wrong_overlay", "bad_signature", "unsigned", "oversized",
                             "malformed", "unknown_sender", "untrusted_cert", "expired", "revoked",
                             "wrong_address", "sender_mismatch", "foreign_source", "bad_version", "wrong_recipient"}
    def delta() -> dict:
        after = target.status()["drops"]
        return {k: v for k in set(after) | set(before) if (v := after.get(k, 0) - before.get(k, 0))}
    try:
        wait_until(lambda: delta() == expected, 5, "every hostile message counted", interval=0.2)
    except AssertionError as e:
        raise AssertionError(f"{e}: counted {delta()}, sent {expected}") from None
    # the one genuine ("captured") message went through exactly once
    msgs = [l for l in target.lines[mark:] if l["event"] == "message" and l["type"] == "probe"]
    assert len(msgs) == res["accepted"] == 1 and msgs[0]["node_id"] == captured.node_id
    # and the node keeps working: still online, same peers, messages flow both ways
    assert target.status()["online"] and target.peers() == {m.node_id for m in nodes if m is not target}
    target.command(cmd="send", to=other.node_id, type="link_answer", payload={"ok": 1})
    other.wait_for(lambda l: l["event"] == "message" and l["type"] == "link_answer", 5, "message after attack")
    assert target.proc.poll() is None


def test_prosody_restart_nodes_reconnect_and_rediscover(world):
    lab, nodes = world["lab"], world["nodes"]
    for n in nodes:
        n.drain()
    t_restart = time.time()
    lab.restart_prosody()
    for n in nodes:
        n.wait_for(lambda l: l["event"] == "offline" and l["t"] >= t_restart - 0.1, 10, "offline after restart")
    since = {n.name: t_restart for n in nodes}
    last = _all_see_each_other(nodes, REDISCOVERY_BOUND, since)
    MEASURED["rediscovery_after_restart_s"] = round(last - t_restart, 3)
    assert last - t_restart < REDISCOVERY_BOUND
    for n in nodes:
        assert n.wait_for(lambda l: l["event"] == "online" and l["t"] >= t_restart, 1, "online")
        st = n.status()
        assert st["online"] and len(st["peers"]) == 4 and all(p["reachable"] for p in st["peers"]), st
    # and messages flow again
    nodes[3].command(cmd="send", to=nodes[2].node_id, type="link_offer", payload={"after": "restart"})
    nodes[2].wait_for(lambda l: l["event"] == "message" and l["payload"] == {"after": "restart"}, 5, "message")


def test_revocation_takes_effect_on_running_nodes(world):
    """A member revoked while running is dropped by the others (CRL re-read on change, certs re-checked).
    The victim is a sixth member of its own, so the group's five stay as they were."""
    lab, d, nodes, ca = world["lab"], world["dir"], world["nodes"], world["ca"]
    victim_ident = make_member(ca, d / "victim", "victim")
    t_start = time.time()
    victim = start_node(lab, "pubh2", d / "victim", OVERLAY, d, user="victim", password=lab.add_account("victim"),
                        name="victim")
    try:
        for n in nodes:
            n.wait_for(lambda l: l["event"] in ("appeared", "refreshed", "changed") and l["node_id"] == victim.node_id
                       and l["t"] >= t_start, DISCOVERY_BOUND, "the victim's announce")
        ca.revoke(victim_ident.node_id)
        t = time.time()
        give_crl(world, nodes)
        for n in nodes:
            left = n.wait_for(lambda l: l["event"] == "left" and l["node_id"] == victim.node_id and l["t"] >= t, 5,
                              "revoked peer dropped")
            assert left["reason"] == "revoked"
            assert victim.node_id not in n.peers()
    finally:
        victim.stop()


def test_bad_password_and_untrusted_server_are_clear_errors(world, tmp_path):
    lab, d, nodes = world["lab"], world["dir"], world["nodes"]
    ident = d / nodes[0].name.split("-")[0]
    n = start_node(lab, "pubh1", ident, OVERLAY, tmp_path, password="wrong", name="badpw")
    err = n.wait_for(lambda l: l["event"] == "error", 15, "error")
    assert "not authorized" in err["error"] and "check the password" in err["error"]
    assert n.proc.wait(timeout=5) == 1
    make_lab_ca(tmp_path / "other")
    n = start_node(lab, "pubh1", ident, OVERLAY, tmp_path, ca=tmp_path / "other" / "ca.crt", name="badca")
    err = n.wait_for(lambda l: l["event"] == "error", 15, "error")
    assert "TLS certificate not trusted" in err["error"], err
    assert n.proc.wait(timeout=5) == 1
