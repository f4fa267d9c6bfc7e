"""SocialVPN state without anything running: pins (trust on first use), the address book
(own address, stable per-friend-node addresses, overrides), the friend list's states."""

from __future__ import annotations

import ipaddress
import json
import os

import pytest

from ipop_switch.social.addressbook import AddressBook
from ipop_switch.social.friends import FriendList, NodeState
from ipop_switch.social.ids import BadName, bare_jid, friend_label, node_name, split_full
from ipop_switch.social.pins import PinStore, Verdict, normal_fp, show_fp
from ipop_switch.social.store import SocialStateError

FP_A = "ab" * 32
FP_B = "cd" * 32
NID_A = "1" * 32
NID_B = "2" * 32


def test_names_checked_at_the_edge():
    assert bare_jid("Bob@Lab.Example/Laptop") == "bob@lab.example"
    assert split_full("bob@lab/laptop-2") == ("bob@lab", "laptop-2")
    assert friend_label("bob.smith@lab") == "bob-smith"
    for bad in ("", "bob", "@lab", "bob@", "bo b@lab", "bob@la..b", "x" * 70 + "@lab"):
        with pytest.raises(BadName):
            bare_jid(bad)
    for bad in ("", "-x", "a/b", "a.b", "x" * 64, "ü"):
        with pytest.raises(BadName):
            node_name(bad)
    with pytest.raises(BadName):
        split_full("bob@lab")


def test_fingerprints_normalised_and_shown_in_groups():
    assert normal_fp(show_fp(FP_A.upper())) == FP_A
    assert show_fp(FP_A).count(":") == 15
    with pytest.raises(SocialStateError):
        normal_fp("abc")


def test_pin_on_first_sight_refuse_change_until_forgotten(tmp_path):
    path = tmp_path / "pins.json"
    pins = PinStore.load(path)
    assert pins.check("bob@lab", "laptop", FP_A, NID_A) is Verdict.PINNED
    assert pins.check("bob@lab", "laptop", FP_A, NID_A) is Verdict.MATCH
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    # a new key is refused, loudly: counted, the offered key kept for the user to see
    for _ in range(3):
        assert pins.check("bob@lab", "laptop", FP_B, NID_B) is Verdict.CHANGED
    assert pins.refused[("bob@lab", "laptop")].count == 3
    assert pins.refused[("bob@lab", "laptop")].fingerprint == FP_B
    # across a restart: still pinned, still refused (nothing silently re-pinned)
    pins = PinStore.load(path)
    assert pins.check("bob@lab", "laptop", FP_B, NID_B) is Verdict.CHANGED
    assert pins.forget("bob@lab", "laptop")
    assert not pins.forget("bob@lab", "laptop")
    assert pins.check("bob@lab", "laptop", FP_B, NID_B) is Verdict.PINNED
    assert PinStore.load(path).pins[("bob@lab", "laptop")].fingerprint == FP_B


def test_verify_marks_only_a_matching_pin(tmp_path):
    pins = PinStore.load(tmp_path / "p.json")
    pins.check("bob@lab", "laptop", FP_A, NID_A)
    pins.check("bob@lab", "phone", FP_B, NID_B)
    with pytest.raises(SocialStateError, match="no node of bob@lab"):
        pins.verify("bob@lab", "ef" * 32)
    assert pins.verify("bob@lab", show_fp(FP_A)) == ["laptop"]
    again = PinStore.load(tmp_path / "p.json")
    assert again.pins[("bob@lab", "laptop")].verified
    assert not again.pins[("bob@lab", "phone")].verified


def test_corrupt_pin_file_is_a_clear_error(tmp_path):
    path = tmp_path / "pins.json"
    path.write_text("{not json")
    with pytest.raises(SocialStateError, match="move it away"):
        PinStore.load(path)
    path.write_text(json.dumps({"pins": {"bob@lab/laptop": {"fingerprint": "zz"}}}))
    with pytest.raises(SocialStateError):
        PinStore.load(path)


def test_addresses_stable_across_restarts_and_overrides_win(tmp_path):
    path = tmp_path / "addr.json"
    book = AddressBook.load(path)
    assert str(book.own) == "100.80.0.1"
    a = book.address_of("bob@lab", "laptop")
    c = book.address_of("carol@lab", "pc")
    assert a != c and a != book.own
    assert all(ipaddress.ip_address(x) in ipaddress.ip_network("100.64.0.0/10") for x in (a, c, book.own))
    book2 = AddressBook.load(path)
    # the order of asking does not matter after a restart: kept assignments
    assert book2.address_of("carol@lab", "pc") == c
    assert book2.address_of("bob@lab", "laptop") == a
    book3 = AddressBook.load(path, overrides={"bob@lab/laptop": "100.80.9.9"})
    assert str(book3.address_of("bob@lab", "laptop")) == "100.80.9.9"
    assert book3.address_of("carol@lab", "pc") == c
    lines = book3.hosts("social.internal", [("bob@lab", "laptop")])
    assert lines == ["100.80.9.9\tlaptop.bob.social.internal"]


def test_address_book_bad_config_refused(tmp_path):
    with pytest.raises(SocialStateError, match="IPv4"):
        AddressBook.load(tmp_path / "a", network="fd00::/64")
    with pytest.raises(SocialStateError, match="not in the range"):
        AddressBook.load(tmp_path / "a", own="100.99.0.1")
    with pytest.raises(SocialStateError, match="other than our own"):
        AddressBook.load(tmp_path / "a", overrides={"bob@lab/x": "100.80.0.1"})
    with pytest.raises(SocialStateError, match="name the node"):
        AddressBook.load(tmp_path / "a", overrides={"bob@lab": "100.80.0.7"})


def test_range_full_is_an_error(tmp_path):
    book = AddressBook.load(tmp_path / "a", network="100.80.0.0/29")  # 6 hosts, one is ours
    for i in range(5):
        book.address_of("bob@lab", f"n{i}")
    with pytest.raises(SocialStateError, match="full"):
        book.address_of("bob@lab", "n5")


def test_friend_list_states(tmp_path):
    fl = FriendList(PinStore.load(tmp_path / "p.json"))
    # not (yet) a friend: refused and counted, no state kept
    assert fl.node_seen("bob@lab", "laptop", NID_A, FP_A) is NodeState.REFUSED
    assert fl.drops == {"not_friend": 1} and not fl.nodes
    assert not fl.roster("bob@lab", "to", ask=True)       # half a friendship is none
    assert fl.roster("bob@lab", "both")
    assert fl.node_seen("bob@lab", "laptop", NID_A, FP_A) is NodeState.PENDING
    assert set(fl.wanted()) == {NID_A}
    fl.link("bob@lab", "laptop", True)
    assert fl.nodes[("bob@lab", "laptop")].state is NodeState.LINKED
    # a forged announce with another key while the pinned node is here: counted, nothing changes
    assert fl.node_seen("bob@lab", "laptop", NID_B, FP_B) is NodeState.REFUSED
    assert fl.nodes[("bob@lab", "laptop")].state is NodeState.LINKED and set(fl.wanted()) == {NID_A}
    assert fl.drops["key_changed"] == 1
    # bob re-initialises: his old node leaves, the new key is refused until forgotten
    fl.node_gone("bob@lab", "laptop")
    assert fl.node_seen("bob@lab", "laptop", NID_B, FP_B) is NodeState.REFUSED
    assert fl.nodes[("bob@lab", "laptop")].state is NodeState.REFUSED and not fl.wanted()
    assert fl.forget("bob@lab", "laptop")
    assert fl.node_seen("bob@lab", "laptop", NID_B, FP_B) is NodeState.PENDING
    assert set(fl.wanted()) == {NID_B}
    # unfriended: nodes gone, nothing wanted; a malformed subscription changes nothing
    assert not fl.roster("bob@lab", "sideways")
    assert fl.drops["bad_subscription"] == 1 and set(fl.wanted()) == {NID_B}
    assert fl.roster("bob@lab", "remove")
    assert not fl.wanted() and not fl.nodes


def test_dns_answers_this_nodes_view_and_listens_on_loopback_only():
    """A social overlay's responder: <node>.<friend>.<suffix> -> our assigned address (own name
    first, a name claimed twice kept once, names outside the zone left out); never on the
    overlay address, where a friend could ask for the names of our other friends."""
    from dnslib import QTYPE, RCODE, DNSRecord

    from ipop_switch.agent.dns import listen_addresses, social_table
    from ipop_switch.config import OverlayConfig, dns_loopback
    from ipop_switch.naming.dns import DnsResponder

    tab = social_table("ipsw.internal", [("laptop.alice.ipsw.internal", "100.80.0.1"),
                                         ("desk.bob.ipsw.internal", "100.80.0.2"),
                                         ("Desk.Bob.ipsw.internal.", "100.80.0.9"),
                                         ("pc.carol.elsewhere.org", "100.80.0.3")])
    assert len(tab) == 2 and tab.conflicts == ["desk.bob.ipsw.internal"] and tab.ignored == 1
    dns = DnsResponder(lambda: tab, listen=[])

    def ask(name: str, qtype: str = "A") -> DNSRecord:
        return DNSRecord.parse(dns.respond(DNSRecord.question(name, qtype).pack()))
    r = ask("desk.bob.ipsw.internal")
    assert r.header.rcode == RCODE.NOERROR and [str(x.rdata) for x in r.rr] == ["100.80.0.2"]
    assert [str(x.rdata) for x in ask("laptop.alice.ipsw.internal").rr] == ["100.80.0.1"]
    assert ask("pc.carol.ipsw.internal").header.rcode == RCODE.NXDOMAIN
    assert ask("desk.bob.ipsw.internal", "AAAA").rr == [] and ask("example.org").header.rcode == RCODE.REFUSED
    assert QTYPE.get(ask("desk.bob.ipsw.internal", "ANY").rr[0].rtype) == "A"

    xmpp = {"server": "198.18.0.1", "jid": "alice@lab", "password": "x"}
    soc = OverlayConfig.parse(dict(name="soc", kind="social", address="100.80.0.1/16", xmpp=xmpp, dns={"enable": True}))
    assert listen_addresses(soc) == [(dns_loopback("soc"), 53)]
    only = OverlayConfig.parse(dict(name="soc", kind="social", address="100.80.0.1/16", xmpp=xmpp,
                                    dns={"enable": True, "listen": ["overlay"]}))
    assert listen_addresses(only) == [(dns_loopback("soc"), 53)]
    grp = OverlayConfig.parse(dict(name="grp", address="100.81.0.1/16", xmpp=xmpp, dns={"enable": True}))
    assert listen_addresses(grp) == [("100.81.0.1", 53), (dns_loopback("grp"), 53)]
    from ipop_switch.cli.dns import advice     # 'ipop-switch dns' tells the same
    a = advice(soc)
    assert a["zone"] == "ipsw.internal" and a["listen"] == [f"{dns_loopback('soc')}:53"] and not a["resolved"]
    assert a["names"] == ["<node>.<friend>.ipsw.internal"]


def test_status_shows_the_social_block():
    """'ipop-switch status' of a social overlay: the friends' nodes (state, our address for
    them, path, RTT, pin), a refused key with what to do, pending requests, counted refusals."""
    from rich.console import Console

    from ipop_switch.render import render_status
    node = {"state": "linked", "node_id": NID_B, "fingerprint": show_fp(FP_B), "verified": True,
            "address": "100.80.0.2", "path": "relay", "rtt_ms": 1.234, "refused": None}
    bad = {**node, "state": "refused", "path": None, "rtt_ms": None, "verified": False,
           "refused": {"fingerprint": show_fp(FP_A), "count": 3}}
    social = {"jid": "alice@lab", "node": "laptop", "address": "100.80.0.1", "range": "100.80.0.0/16",
              "fingerprint": show_fp(FP_A), "drops": {"not_friend": 2, "key_changed": 3, "zero": 0},
              "friends": {"bob@lab": {"subscription": "both", "asked": False, "requested": False, "nodes": {"desk": node}},
                          "carol@lab": {"subscription": "both", "asked": False, "requested": False, "nodes": {"pc": bad}},
                          "dave@lab": {"subscription": "none", "asked": False, "requested": True, "nodes": {}}}}
    st = {"node": {"node_id": NID_A}, "overlays": [{"name": "soc", "kind": "social", "peers": [], "social": social}]}
    console = Console(record=True, width=200)
    render_status(st, console)
    out = console.export_text()
    assert "social: alice@lab/laptop at 100.80.0.1 (friends in 100.80.0.0/16); 2 friends, 1 of 2 nodes linked" in out
    assert "dave@lab (wants to be friends)" in out
    row = next(line for line in out.splitlines() if "desk" in line)
    for cell in ("bob@lab", "linked", "100.80.0.2", "relay", "1.23 ms", "verified"):
        assert cell in row, row
    assert "REFUSED a new key of carol@lab/pc" in out and "3 times" in out and "friends forget carol@lab pc" in out
    assert "social refusals: key_changed 3, not_friend 2" in out and "zero" not in out
