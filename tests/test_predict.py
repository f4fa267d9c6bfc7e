"""Port prediction's parts without a lab: the birthday bound, roles from candidates, the
authenticated messages, and one run of both roles over loopback sockets (real sockets, the
easy side's ports told where the hard side's sockets are, since there is no NAT here)."""

from __future__ import annotations

import asyncio
import os

import pytest
from aioice.candidate import Candidate

from ipop_switch.tunnel import predict


def cand(typ: str, host: str, port: int, raddr: str | None = None, rport: int | None = None,
         prio: int = 100) -> Candidate:
    return Candidate(foundation="f", component=1, transport="udp", priority=prio, host=host, port=port,
                     type=typ, related_address=raddr, related_port=rport)


EASY = [cand("host", "100.64.1.11", 5000), cand("srflx", "198.18.1.1", 5000, "100.64.1.11", 5000)]
HARD = [cand("host", "100.64.2.11", 6000), cand("srflx", "198.18.2.1", 41234, "100.64.2.11", 6000)]
BLOCKED = [cand("host", "100.64.3.11", 7000), cand("relay", "198.18.0.2", 50000, "198.18.3.1", 7001)]


def test_expected_success_is_the_birthday_bound() -> None:
    p = predict.expected_success(256, 1024)
    assert 0.98 < p < 0.985                       # 1 - (1 - 256/64512)^1024 ~ 0.983
    assert predict.expected_success(0, 1024) == 0.0
    assert predict.expected_success(256, 64512) == 1.0
    assert predict.expected_success(256, 512) < p < predict.expected_success(256, 2048)


def test_roles_from_candidates() -> None:
    assert predict.mapping(EASY) == "easy" and predict.mapping(HARD) == "hard"
    assert predict.mapping(BLOCKED) == "unknown"
    e, h = predict.plan(EASY, HARD), predict.plan(HARD, EASY)
    assert e is not None and h is not None
    assert e.role == predict.EASY and h.role == predict.HARD
    for p in (e, h):                              # both sides plan the same run
        assert p.easy_addr == ("198.18.1.1", 5000) and p.easy_base == ("100.64.1.11", 5000)
        assert p.hard_ip == "198.18.2.1" and p.hard_base == "100.64.2.11"
    assert predict.plan(HARD, HARD) is None       # two port-changing NATs: no prediction
    assert predict.plan(EASY, EASY) is None       # ICE gets those direct by itself
    assert predict.plan(HARD, BLOCKED) is None


def test_messages_are_authenticated_and_not_reflectable() -> None:
    k = predict.key(("ufa", "pwa"), ("ufb", "pwb"))
    assert k != predict.key(("ufb", "pwb"), ("ufa", "pwa"))
    nonce = os.urandom(8)
    m = predict.pack(k, predict.HARD, predict.REQ, nonce)
    assert m[0] == predict.PROBE
    assert predict.parse(k, m, predict.HARD) == (predict.REQ, nonce)
    assert predict.parse(k, m, predict.EASY) is None          # back to its sender: refused
    assert predict.parse(os.urandom(32), m, predict.HARD) is None
    bad = bytearray(m)
    bad[5] ^= 1
    assert predict.parse(k, bytes(bad), predict.HARD) is None
    assert predict.parse(k, m[:-1], predict.HARD) is None
    assert predict.parse(k, b"", predict.HARD) is None


class _Filtered:
    """A transport that remembers where it sent: the easy NAT's address-and-port filter."""

    def __init__(self, tr) -> None:
        self.tr = tr
        self.sent_to: set = set()

    def sendto(self, data: bytes, addr) -> None:
        self.sent_to.add(tuple(addr))
        self.tr.sendto(data, addr)


class _Easy(asyncio.DatagramProtocol):
    """Stands where the easy side's hooked ICE socket is, behind an address-and-port-dependent
    filter (what it never sent to is dropped); its prediction messages go to the run."""

    def __init__(self) -> None:
        self.transport = None
        self.run: predict.Prediction | None = None
        self.filtered = 0

    def connection_made(self, transport) -> None:
        self.transport = _Filtered(transport)

    def datagram_received(self, data: bytes, addr) -> None:
        if tuple(addr) not in self.transport.sent_to:
            self.filtered += 1
            return
        if data[:1] == bytes([predict.PROBE]) and self.run is not None:
            self.run.received(self, data, addr)


def test_a_run_over_loopback_finds_the_one_mapped_port_and_closes_the_rest() -> None:
    async def main():
        loop = asyncio.get_running_loop()
        tr, easy_proto = await loop.create_datagram_endpoint(_Easy, local_addr=("127.0.0.1", 0))
        eport = tr.get_extra_info("sockname")[1]
        k = predict.key(("a", "pa"), ("b", "pb"))
        s = predict.Settings(sockets=8, probes=64, rate=1000, start_delay=0.2, rounds=2, linger=0.5)
        plan_h = predict.Plan(predict.HARD, ("127.0.0.1", eport), ("127.0.0.1", eport), "127.0.0.1", "127.0.0.1")
        plan_e = predict.Plan(predict.EASY, ("127.0.0.1", eport), ("127.0.0.1", eport), "127.0.0.1", "127.0.0.1")
        hard = predict.Prediction(plan_h, k, s)
        target: list[int] = []

        def ports(n: int) -> list[int]:          # one of the hard side's sockets among closed ports
            target.append(hard.socks[3].transport.get_extra_info("sockname")[1])
            return list(range(1, n)) + target
        easy = predict.Prediction(plan_e, k, s, easy_protocol=easy_proto, ports=ports)
        easy_proto.run = easy
        wh, we = await asyncio.wait_for(asyncio.gather(hard.run(), easy.run()), 10)
        assert wh is not None and we is not None
        assert we.addr == ("127.0.0.1", target[0])               # the easy side found the port
        assert wh.addr == ("127.0.0.1", eport)                   # the hard side its peer
        assert hard.socks == [wh.protocol] and not wh.protocol.transport.is_closing()
        assert easy.sent <= 64 and hard.bad == easy.bad == 0
        assert easy_proto.filtered >= 8               # the hard side's first requests met the filter
        hard.close_all()
        assert wh.protocol.transport.is_closing()
        tr.close()
    asyncio.run(main())


def test_a_run_without_a_peer_ends_with_nothing() -> None:
    async def main():
        k = predict.key(("a", "pa"), ("b", "pb"))
        s = predict.Settings(sockets=4, rounds=1, linger=0.2)
        plan_h = predict.Plan(predict.HARD, ("127.0.0.1", 9), ("127.0.0.1", 9), "127.0.0.1", "127.0.0.1")
        run = predict.Prediction(plan_h, k, s)
        assert await asyncio.wait_for(run.run(), 5) is None
        assert run.socks == [] and run.sent == 4
    asyncio.run(main())


def test_opt_out_reaches_the_link_spec() -> None:
    """``[overlay.ice] port_prediction = false`` is carried to the worker's LinkSpec."""
    from ipop_switch.config import ConfigError, IceConfig
    from ipop_switch.tunnel.messages import LinkSpec
    assert IceConfig().port_prediction is True
    off = IceConfig(port_prediction=False)
    spec = LinkSpec(link_id="l", peer_id="p", controlling=True, local_static=bytes(32), peer_static=bytes(32),
                    tap="ipt0", port_prediction=off.port_prediction)
    assert LinkSpec.from_json(spec.to_json()).port_prediction is False
    with pytest.raises(ConfigError, match="port_prediction: expected bool, got str"):
        IceConfig.parse({"port_prediction": "maybe"})
