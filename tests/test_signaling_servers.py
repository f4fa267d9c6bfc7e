"""Several XMPP servers (a cluster): the config forms, node config and session config alike.
The session moving between servers is tested against a running ejabberd cluster in
tests/test_xmpp_cluster_lab.py."""

from __future__ import annotations


import pytest
from pydantic import ValidationError

from ipop_switch.config import XmppConfig
from ipop_switch.signaling.config import SignalingConfig


def test_config_forms():
    one = XmppConfig(server="x.test", jid="a@x.test", password="p")
    assert one.where() == "x.test:5222"
    many = XmppConfig(servers=["198.18.0.1", "198.18.0.4:5223", "[fd00::1]:5224"], jid="a@x.test", password="p")
    assert many.where() == "198.18.0.1, 198.18.0.4:5223, [fd00::1]:5224"
    with pytest.raises(ValidationError, match="give server"):
        XmppConfig(jid="a@x.test", password="p")
    with pytest.raises(ValidationError, match="bad port"):
        XmppConfig(servers=["h:99999"], jid="a@x.test", password="p")
    s = SignalingConfig(jid="a@x.test", password="p", servers=many.servers, port=5222)
    assert s.endpoints() == [("198.18.0.1", 5222), ("198.18.0.4", 5223), ("fd00::1", 5224)]
    assert SignalingConfig(jid="a@x.test", password="p", server="h").endpoints() == [("h", 5222)]
    assert SignalingConfig(jid="a@x.test", password="p").endpoints() == [("x.test", 5222)]
    with pytest.raises(ValidationError):
        SignalingConfig(jid="a@x.test", password="p", servers=["h:0"])


def test_the_room_watch_keeps_no_schedule_in_memory(monkeypatch):
    """The room check's delays come from an iterator: a tuple of them (10 million floats)
    once held 80 MB in every agent, half of a node's memory."""
    import asyncio
    import tracemalloc
    from types import SimpleNamespace

    from ipop_switch.signaling import session as session_mod

    monkeypatch.setattr(session_mod.random, "uniform", lambda a, b: 0.0)     # no pauses
    sess = session_mod.SignalingSession.__new__(session_mod.SignalingSession)
    sess.cfg = SimpleNamespace(room_check=10.0)
    sess.overlay = "t"
    checks = []

    class Disco:
        async def check(self, conn):
            checks.append(conn)
            if len(checks) >= 5:
                raise asyncio.CancelledError
            return None

    tracemalloc.start()
    try:
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(sess._room_watch("conn", Disco()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(checks) == 5
    assert peak < 2_000_000, peak
