"""The agent <-> pool channel messages and link settings: round trips and clear refusals."""

from __future__ import annotations

import asyncio
import struct

import pytest

from ipop_switch.tunnel import LinkSpec, TurnServer, messages
from ipop_switch.tunnel.timers import Timers


def spec(**kw) -> LinkSpec:
    base = dict(link_id="l1", peer_id="ab" * 16, controlling=True, local_static=b"\1" * 32,
                peer_static=b"\2" * 32, tap="ipt1", stun=("198.18.0.2", 3478),
                turn=TurnServer("198.18.0.2", 3478, "u", "p", "tcp"), exclude_interfaces=("docker0",),
                timers={"keepalive": 0.5})
    base.update(kw)
    return LinkSpec(**base)


def test_linkspec_json_roundtrip():
    s = spec()
    assert LinkSpec.from_json(messages.json.loads(messages.json.dumps(s.to_json()))) == s


@pytest.mark.parametrize("bad", [dict(local_static=b"short"), dict(peer_static="x" * 32), dict(link_id="")])
def test_linkspec_refuses_bad_fields(bad):
    with pytest.raises(ValueError):
        spec(**bad)


def test_timers_refuse_unknown_and_nonpositive():
    assert Timers.from_dict({"dead_after": 3}).dead_after == 3.0
    with pytest.raises(ValueError, match="unknown timer"):
        Timers.from_dict({"dead_afterr": 3})
    with pytest.raises(ValueError, match="positive"):
        Timers.from_dict({"keepalive": 0})


def test_channel_framing_and_limits():
    async def go():
        r = asyncio.StreamReader()
        r.feed_data(messages.encode({"kind": "stats", "req": 1}))
        r.feed_data(struct.pack("!I", messages.MAX_FRAME + 1))
        assert await messages.read_msg(r) == {"kind": "stats", "req": 1}
        with pytest.raises(ValueError):
            await messages.read_msg(r)
        r2 = asyncio.StreamReader()
        r2.feed_data(messages.encode({"no": "kind"}))
        with pytest.raises(ValueError):
            await messages.read_msg(r2)
        r3 = asyncio.StreamReader()
        r3.feed_eof()
        assert await messages.read_msg(r3) is None
    asyncio.run(go())


def test_worker_snapshot_carries_the_fields_status_shows():
    """The agent passes a worker's counters to ``status`` as they come (no renaming in
    between), so the snapshot itself must carry the names agent/overlay.py reads."""
    import time

    from ipop_switch.tunnel.datapath import Datapath
    from ipop_switch.tunnel.ice import Path
    from ipop_switch.tunnel.link import LinkWorker
    from ipop_switch.tunnel.session import Session

    w = LinkWorker(spec(), lambda msg: None)
    snap = w.snapshot()
    assert snap["candidates"] is None and snap["last_handshake_s"] is None
    w.dp = Datapath(-1, w.stats, lambda s, p: None, lambda *a: None)
    w.dp.table.current = Session(b"\3" * 32, b"\4" * 32, 7, 8, initiator=True)
    w.dp.table.current.created = time.monotonic() - 42.0
    w.path = Path(lambda d: None, "direct", "host 198.18.0.1:4000", "srflx 198.18.0.2:5000",
                  None, ("198.18.0.2", 5000))
    snap = w.snapshot()
    assert snap["candidates"] == "host->srflx"
    assert 42.0 <= snap["last_handshake_s"] < 50.0
    read_by_status = {"candidates", "rtt_ms", "tx_frames", "tx_bytes", "rx_frames", "rx_bytes", "drops",
                      "last_handshake_s"}
    assert read_by_status <= set(snap)
