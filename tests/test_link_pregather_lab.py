"""The controlled side gathers its candidates while the offer is on its way, not after it.

A host whose UDP to the STUN/TURN server is blocked takes the STUN timeout (~3 s) to gather;
when it gathered only after the peer's offer arrived, that wait came on top of the peer's
own gathering, on every attempt (the UDP-blocked pair's first frame took 10.5 s). Here the
offer is held back 5 s; the answer must then leave at once, and the link come up."""

from __future__ import annotations

import asyncio

import pytest

from conftest import unique_name
from helpers.link_harness import Mesh
from ipop_switch import proc
from ipop_switch.lab import Lab, LabSpec, SiteSpec

pytestmark = [pytest.mark.lab]

UP_TIMEOUT = 40.0
HOLD = 5.0          # the offer is held back this long: the blocked side's gathering ends meanwhile


def test_controlled_side_answers_at_once_after_a_late_offer():
    lab = Lab(LabSpec(name=unique_name("g"), sites=(SiteSpec("a", "none"), SiteSpec("b", "none"))))
    try:
        lab.up()
        turn = lab.services()["turn"]

        async def scenario():
            mesh = Mesh(lab)
            try:
                await mesh.start(["ah1", "bh1"])
                na, nb = mesh.nodes["ah1"], mesh.nodes["bh1"]
                controlled = "bh1" if na.node_id > nb.node_id else "ah1"
                # the controlled host's UDP to the STUN/TURN server is dropped: gathering waits out
                # the STUN timeout and ends with host candidates only (the pair is direct)
                proc.run(["nft", "-f", "-"], netns=lab.netns_of(controlled), input=(
                    "table inet nostun {\n chain out {\n  type filter hook output priority filter; policy accept;\n"
                    f"  ip daddr {turn['address']} udp dport {turn['port']} drop\n }}\n}}\n"))
                link_id = "L1-ah1-bh1"
                mesh.block_signaling.add(link_id)
                lp = await mesh.open("ah1", "bh1", index=1)
                assert lp.link_id == link_id
                await asyncio.sleep(HOLD)
                start = len(mesh.relayed)
                mesh.block_signaling.discard(link_id)
                await mesh.wait_up(lp, UP_TIMEOUT)
                assert (await mesh.ping("ah1", lp.addr_b, count=2)).returncode == 0
                log = list(zip(mesh.relayed[start:], mesh.relayed_at[start:]))
                answers = [i for i, ((h, t, _), _) in enumerate(log) if t == "link_answer" and h == controlled]
                assert answers, log
                i = answers[0]
                offers = [at for (h, t, _), at in log[:i] if t == "link_offer" and h != controlled]
                assert offers, log
                took = log[i][1] - offers[-1]
                print(f"\nthe controlled side answered {took * 1000:.0f} ms after the offer "
                      f"(its gathering alone takes the STUN timeout)")
                assert took < 1.0, (took, [(h, t, round(at - log[0][1], 3)) for (h, t, _), at in log])
            finally:
                await mesh.stop()

        asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        lab.down()
