"""Run one node's signaling session and report what it sees as JSON lines (tests, demos, the
"Done when" check before the agent exists).

    python -m ipop_switch.signaling.harness --identity DIR --overlay NAME --jid USER@DOMAIN \
        --password PW --server HOST --ca CA.crt

stdout, one JSON object per line: {"event": "online"|"offline"|"appeared"|"changed"|"refreshed"|
"left"|"message"|"send_failed"|"sent"|"status"|"error", "t": unix time, ...}; an "appeared" line
carries the peer's node id and verified certificate subject and fingerprint.
stdin, one JSON command per line: {"cmd": "status"}, {"cmd": "send", "to": ID, "type": T,
"payload": {...}}, {"cmd": "quit"}. Exit status 1 with an "error" line if the session cannot start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..errors import IpopError
from ..identity import NodeIdentity
from .config import SignalingConfig
from .events import PeerAppeared, PeerChanged, PeerLeft, PeerMessage, PeerRefreshed, SendFailed, SessionState
from .session import SignalingSession


def out(event: str, **kw) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.time(), **kw}) + "\n")
    sys.stdout.flush()


def _peer(p) -> dict:
    return {"node_id": p.node_id, "subject": p.subject, "fingerprint": p.fingerprint}


async def pump_events(s: SignalingSession) -> None:
    async for ev in s.events():
        if isinstance(ev, SessionState):
            out("online" if ev.online else "offline", detail=ev.detail)
        elif isinstance(ev, PeerAppeared):
            out("appeared", **_peer(ev.peer), caps=ev.caps)
        elif isinstance(ev, PeerChanged):
            out("changed", **_peer(ev.peer), caps=ev.caps)
        elif isinstance(ev, PeerRefreshed):
            out("refreshed", **_peer(ev.peer))
        elif isinstance(ev, PeerLeft):
            out("left", node_id=ev.node_id, reason=ev.reason)
        elif isinstance(ev, PeerMessage):
            out("message", node_id=ev.node_id, type=ev.type, payload=ev.payload)
        elif isinstance(ev, SendFailed):
            out("send_failed", node_id=ev.node_id, type=ev.type, reason=ev.reason)


async def commands(s: SignalingSession) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        try:
            cmd = json.loads(line)
            what = cmd["cmd"]
        except (ValueError, KeyError, TypeError):
            out("error", error=f"bad command {line[:80]!r}")
            continue
        if what == "quit":
            return
        if what == "status":
            out("status", **s.status())
        elif what == "send":
            try:
                fut = s.send_nowait(cmd["to"], cmd["type"], cmd.get("payload", {}))
            except (ValueError, KeyError) as e:
                out("error", error=f"send: {e}")
                continue
            fut.add_done_callback(lambda f, c=cmd: out("sent", to=c["to"], type=c["type"]) if not f.exception()
                                  else None)
        else:
            out("error", error=f"unknown command {what!r}")


async def main(args: argparse.Namespace) -> int:
    cfg = SignalingConfig(
        jid=args.jid, password=args.password or os.environ.get("IPSW_XMPP_PASSWORD", ""),
        server=args.server, port=args.port, ca_file=args.ca, room=args.room,
        capabilities={"harness": True}, connect_timeout=args.connect_timeout, backoff_min=args.backoff_min,
        backoff_max=args.backoff_max, keepalive=args.keepalive, queue_timeout=args.queue_timeout,
        rejoin_grace=args.rejoin_grace, leave_grace=args.leave_grace, recheck_interval=args.recheck)
    try:
        ident = NodeIdentity.load(args.identity).membership(args.overlay, self_check=not args.no_self_check)
    except IpopError as e:
        out("error", error=str(e))
        return 1
    s = SignalingSession(ident, cfg)
    out("starting", node_id=ident.node_id, subject=ident.own.subject)
    pump = asyncio.create_task(pump_events(s))
    try:
        await s.start(wait_online=args.wait_online)
    except IpopError as e:
        out("error", error=str(e))
        pump.cancel()
        return 1
    try:
        await commands(s)
    finally:
        await s.stop()
        pump.cancel()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ipop_switch.signaling.harness", description=__doc__.split("\n")[0])
    p.add_argument("--identity", required=True, type=Path)
    p.add_argument("--overlay", required=True)
    p.add_argument("--jid", required=True)
    p.add_argument("--password")
    p.add_argument("--server")
    p.add_argument("--port", type=int, default=5222)
    p.add_argument("--ca", type=Path)
    p.add_argument("--room")
    p.add_argument("--wait-online", type=float, default=15.0)
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--backoff-min", type=float, default=1.0)
    p.add_argument("--backoff-max", type=float, default=60.0)
    p.add_argument("--keepalive", type=float, default=30.0)
    p.add_argument("--queue-timeout", type=float, default=30.0)
    p.add_argument("--rejoin-grace", type=float, default=20.0)
    p.add_argument("--leave-grace", type=float, default=5.0)
    p.add_argument("--recheck", type=float, default=30.0)
    p.add_argument("--no-self-check", action="store_true",
                   help="run even with an own certificate that fails verification (tests that play a bad node)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("slixmpp").setLevel(logging.WARNING)
    sys.exit(asyncio.run(main(a)))
