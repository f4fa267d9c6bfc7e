"""Gather ICE candidates with aioice against the lab's coturn: a relayed candidate
proves a TURN allocation, a server-reflexive one proves STUN. Prints JSON.

aioice drops a failed allocation silently (no relay candidate, no error), so the helper
also asks for one allocation itself and reports the server's answer: a test of a refusal
sees *why* there is no relay (401 for a wrong password), not just that there is none."""

import asyncio
import json
import sys

import aioice
from aioice import stun, turn


class _Closed(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def allocate(server: str, port: int, user: str, password: str, transport: str) -> dict:
    """One TURN allocation: {"ok": True, "relayed": [host, port]} or the error (code from the server)."""
    try:
        tr, proto = await asyncio.wait_for(turn.create_turn_endpoint(
            _Closed, server_addr=(server, port), username=user, password=password,
            transport=transport), 10)
    except stun.TransactionFailed as e:
        code = e.response.attributes.get("ERROR-CODE", (None, ""))[0]
        return {"ok": False, "code": code, "error": str(e)}
    except (stun.TransactionError, OSError, asyncio.TimeoutError) as e:
        return {"ok": False, "code": None, "error": f"{type(e).__name__}: {e}"}
    relayed = tr.get_extra_info("sockname")
    tr.close()                                # deletes the allocation
    await asyncio.wait_for(proto.lost, 5)
    return {"ok": True, "relayed": list(relayed)}


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
    return {"candidates": cands, "allocation": await allocate(server, port, user, password, transport)}


if __name__ == "__main__":
    s, p, u, pw, t = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    print(json.dumps(asyncio.run(main(s, p, u, pw, t))), flush=True)
