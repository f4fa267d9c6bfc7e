"""A relayed link moves to a direct path by itself once one works (make before break)."""

from __future__ import annotations

import asyncio
import time

from conftest import unique_name
from helpers.link_harness import Mesh
from helpers.wait import async_wait_until
from ipop_switch import proc
from ipop_switch.lab import Lab, LabSpec, SiteSpec

UP_TIMEOUT = 30.0
UPGRADE_TIMEOUT = 20.0
PROBE_TIMEOUT = 20.0
# probes one second apart, their ICE checks given up after 3 s: a failed probe is seen in ~4 s
TIMERS = {"upgrade_interval": 1.0, "checks_timeout": 3.0}


def probe_ran_and_ended(relayed: list[tuple[str, str, str]], link_id: str, start: int) -> bool:
    """In the signaling the test relayed since ``start``: a probe offer, its answer, then a next
    probe offer. The controlling side starts a probe only once the previous one has ended, so this
    says one probe ran its checks to the end and did not move the link."""
    types = [t for _, t, lid in relayed[start:] if lid == link_id and t in ("link_probe", "link_probe_answer")]
    try:
        first = types.index("link_probe")
        answer = types.index("link_probe_answer", first)
        types.index("link_probe", answer)
    except ValueError:
        return False
    return True


def test_relayed_link_upgrades_to_direct_without_loss():
    lab = Lab(LabSpec(name=unique_name("u"), sites=(SiteSpec("a", "none"), SiteSpec("b", "none"))))
    try:
        lab.up()
        b_ip = lab.host("bh1").public_ip
        # direct UDP between the two hosts is blocked at first: only the TURN relay works
        block = ("table inet block {\n chain out {\n  type filter hook output priority filter; policy accept;\n"
                 f"  ip daddr {b_ip} meta l4proto udp drop\n }}\n chain in {{\n"
                 "  type filter hook input priority filter; policy accept;\n"
                 f"  ip saddr {b_ip} meta l4proto udp drop\n }}\n}}\n").replace("}}", "}").replace("{{", "{")
        proc.run(["nft", "-f", "-"], netns=lab.netns_of("ah1"), input=block)

        async def scenario():
            mesh = Mesh(lab)
            try:
                await mesh.start(["ah1", "bh1"])
                lp = await mesh.open("ah1", "bh1", index=1, timers=TIMERS)
                ea, eb = await mesh.wait_up(lp, UP_TIMEOUT)
                assert ea["path"] == eb["path"] == "relay", (ea, eb)
                assert (await mesh.ping("ah1", lp.addr_b, count=2)).returncode == 0
                since = (len(lp.a.events), len(lp.b.events))
                # a probe while blocked fails and leaves the relayed link working
                await async_wait_until(lambda: probe_ran_and_ended(mesh.relayed, lp.link_id, 0), PROBE_TIMEOUT,
                                       "a direct probe to run and fail while the direct path is blocked")
                assert not [e for e in lp.a.events[since[0]:] if e.get("ev") in ("path", "down")]
                st = await lp.a.link_stats(lp.link_id)
                assert st["path"] == "relay" and st["upgrades"] == 0, st
                proc.run(["nft", "delete", "table", "inet", "block"], netns=lab.netns_of("ah1"))
                t0 = time.monotonic()
                # keep traffic flowing across the switch: a ping every 0.05 s must all come back
                pinger = asyncio.create_task(asyncio.to_thread(
                    lab.exec, "ah1", ["ping", "-q", "-c", "300", "-i", "0.05", "-W", "2", lp.addr_b],
                    check=False, timeout=60))
                pa, pb = await asyncio.gather(
                    lp.a.wait_event(lambda e: e.get("ev") == "path" and e.get("link_id") == lp.link_id,
                                    UPGRADE_TIMEOUT, "path a", since[0]),
                    lp.b.wait_event(lambda e: e.get("ev") == "path" and e.get("link_id") == lp.link_id,
                                    UPGRADE_TIMEOUT, "path b", since[1]))
                took = max(pa["t"], pb["t"]) - t0
                assert pa["path"] == pb["path"] == "direct", (pa, pb)
                r = await pinger
                assert " 0% packet loss" in r.stdout, r.stdout
                assert not [e for e in lp.a.events[since[0]:] if e.get("ev") == "down"]
                st = await lp.a.link_stats(lp.link_id)
                assert st["path"] == "direct" and st["upgrades"] == 1, st
                print(f"\nrelay -> direct upgrade {took:.1f}s after the path opened; no ping lost")
            finally:
                await mesh.stop()

        asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        lab.down()
