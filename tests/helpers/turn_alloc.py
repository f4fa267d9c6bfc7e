"""Gather ICE candidates with aioice against the lab's coturn: a relayed candidate
proves a TURN allocation, a server-reflexive one proves STUN. Prints JSON."""

import asyncio
import json
import sys

import aioice


async def main(server: str, port: int, user: str, password: str, transport: str) -> dict:
    conn = aioice.Connection(
        ice_controlling=True,
        stun_server=(server, port),
        turn_server=(server, port),   # a tuple: a "host:port" string silently yields no relay
        turn_username=user,
        turn_password=password,
        turn_transport=transport,
        use_ipv6=False,
    )
    await asyncio.wait_for(conn.gather_candidates(), 20)
    cands = [{"type": c.type, "host": c.host, "port": c.port} for c in conn.local_candidates]
    await conn.close()
    return {"candidates": cands}


if __name__ == "__main__":
    s, p, u, pw, t = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    print(json.dumps(asyncio.run(main(s, p, u, pw, t))), flush=True)
