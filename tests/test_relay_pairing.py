"""Which of a peer's host addresses our relay is not paired with (``ice.unreachable_from_relay``):
those its own candidates show to be behind a NAT. Pairing one makes coturn send to an
unroutable address and drop our allocation; two UDP-blocked peers (TURN over TCP, no srflx)
lost their only path, relay<->relay, that way (docs/nat.md). Candidates as the NAT grid's
sites send them."""

from __future__ import annotations

from aioice.candidate import Candidate

from ipop_switch.tunnel.ice import unreachable_from_relay


def cands(*sdps: str) -> list[Candidate]:
    return [Candidate.from_sdp(s) for s in sdps]


HOST = "1 1 udp 2130706431 {} 50000 typ host"
SRFLX = "2 1 udp 1694498815 {} {} typ srflx raddr {} rport 50000"
RELAY = "3 1 udp 16777215 198.18.0.2 {} typ relay raddr {} rport {}"


def test_udp_blocked_peer_without_srflx_its_lan_address_is_unreachable():
    # UDP blocked at its site: no srflx; its TURN allocation over TCP came from the router
    peer = cands(HOST.format("100.64.11.11"), RELAY.format(52001, "198.18.11.1", 40312))
    assert unreachable_from_relay(peer) == {"100.64.11.11"}


def test_natted_peer_with_srflx_as_before():
    peer = cands(HOST.format("100.64.5.11"), SRFLX.format("198.18.5.1", 50000, "100.64.5.11"),
                 RELAY.format(52002, "198.18.5.1", 50001))
    assert unreachable_from_relay(peer) == {"100.64.5.11"}


def test_public_hosts_stay_paired():
    # a public host: its relay's mapped address is its own host address (TCP or UDP)
    assert unreachable_from_relay(cands(HOST.format("198.18.1.11"),
                                        RELAY.format(52003, "198.18.1.11", 41000))) == set()
    # a public interface beside a NATed one: the one a server saw stays, the other goes
    peer = cands(HOST.format("198.18.1.11"), HOST.format("100.64.7.11"),
                 SRFLX.format("198.18.1.11", 50000, "198.18.1.11"), RELAY.format(52004, "198.18.7.1", 41001))
    assert unreachable_from_relay(peer) == {"100.64.7.11"}
    # no relay and no srflx (no TURN, no STUN): nothing is known, nothing is left out
    assert unreachable_from_relay(cands(HOST.format("100.64.9.11"))) == set()


def test_other_family_and_hidden_related_address_are_left_alone():
    # an IPv6 host's relay (IPv4) mapped from its routed IPv6 address; its IPv6 host stays
    v6 = cands(HOST.format("fd00:1:2::11"), HOST.format("100.64.3.11"),
               RELAY.format(52005, "fd00:1:2::11", 41002))
    assert unreachable_from_relay(v6) == set()
    # NATed IPv4 seen by TURN: its IPv4 LAN address goes, its IPv6 one stays
    dual = cands(HOST.format("fd00:1:2::12"), HOST.format("100.64.3.12"),
                 RELAY.format(52006, "198.18.3.1", 41003))
    assert unreachable_from_relay(dual) == {"100.64.3.12"}
    # aioice's relay-only policy hides the related address as 0.0.0.0: it tells nothing
    hidden = cands(HOST.format("100.64.4.11"), RELAY.format(52007, "0.0.0.0", 9))
    assert unreachable_from_relay(hidden) == set()
