"""Run in a lab host's namespace: the signaling sessions of several lab nodes (their node.toml
files), started at the same moment in one process, so that their first joins of the overlay's
room race through different cluster nodes. Prints one JSON line: seconds until every session
verified every other, whether the room was seen split (a session's room presences missing
members another session sees) and the split-room repairs per node.

    python tests/helpers/xmpp_race.py TIMEOUT node1.toml node2.toml ...
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from ipop_switch.agent.overlay import make_signaling
from ipop_switch.config import load_config
from ipop_switch.identity.store import NodeIdentity


async def main(timeout: float, paths: list[str]) -> dict:
    sessions = []
    for p in paths:
        cfg = load_config(p)
        ov = cfg.overlay[0]
        me = NodeIdentity.load(cfg.node.identity_dir).membership(ov.name)
        sessions.append(make_signaling(ov, me))
    t0 = time.monotonic()
    await asyncio.gather(*(s.start() for s in sessions))      # every connect and join at once
    split_seen, took = False, None
    want = len(sessions) - 1
    while time.monotonic() - t0 < timeout:
        views = [frozenset(s._disco.present) for s in sessions if s.online and s._disco is not None]
        # two sessions whose rooms hold none of each other's occupants, once the joins are done
        if time.monotonic() - t0 > 1.5 and any(not (a & b) for a in views for b in views):
            split_seen = True
        if all(len(s.peers()) == want for s in sessions):
            took = time.monotonic() - t0
            break
        await asyncio.sleep(0.05)
    views = []                        # each session's room by presence, and the room the server lists to it
    for s in sessions:
        try:
            listed = await s._conn.room_occupants(s._disco.room)
            views.append({"present": len(s._disco.present), "listed": len(listed), "self_listed": s._disco.nick in listed})
        except Exception as e:
            views.append({"error": f"{type(e).__name__}: {e}"})
    out = {"took": took, "split_seen": split_seen, "views": views,
           "repairs": [s.stats.get("room_repairs", 0) for s in sessions],
           "servers": [s.status()["server"] for s in sessions],
           "last_repair": [s.last_repair for s in sessions]}
    await asyncio.gather(*(s.stop() for s in sessions), return_exceptions=True)
    return out


if __name__ == "__main__":
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    print(json.dumps(asyncio.run(main(float(sys.argv[1]), sys.argv[2:]))), flush=True)
