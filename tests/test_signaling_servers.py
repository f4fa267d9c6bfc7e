"""Several XMPP servers (a cluster): the config forms, node config and session config alike.
The session moving between servers is tested against a running ejabberd cluster in
tests/test_xmpp_cluster_lab.py."""

from __future__ import annotations


import pytest

from ipop_switch.config import XmppConfig
from ipop_switch.signaling.config import SignalingConfig


def test_config_forms():
    one = XmppConfig(server="x.test", jid="a@x.test", password="p")
    assert one.where() == "x.test:5222"
    many = XmppConfig(servers=["198.18.0.1", "198.18.0.4:5223", "[fd00::1]:5224"], jid="a@x.test", password="p")
    assert many.where() == "198.18.0.1, 198.18.0.4:5223, [fd00::1]:5224"
    with pytest.raises(ValueError, match="give server"):
        XmppConfig(jid="a@x.test", password="p")
    with pytest.raises(ValueError, match="bad port"):
        XmppConfig(servers=["h:99999"], jid="a@x.test", password="p")
    s = SignalingConfig(jid="a@x.test", password="p", servers=many.servers, port=5222)
    assert s.endpoints() == [("198.18.0.1", 5222), ("198.18.0.4", 5223), ("fd00::1", 5224)]
    assert SignalingConfig(jid="a@x.test", password="p", server="h").endpoints() == [("h", 5222)]
    assert SignalingConfig(jid="a@x.test", password="p").endpoints() == [("x.test", 5222)]
    with pytest.raises(ValueError):
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


def test_a_strangers_roster_push_gets_an_error_reply_that_serialises():
    """slixmpp 1.17's own filter set the legacy error code as an int: the reply failed in the
    send queue (TypeError) and was never sent. Ours goes out; our own account's push is not
    answered (it updates the roster)."""
    from slixmpp import Iq

    from ipop_switch.signaling.xmpp import stranger_push_reply

    iq = Iq()
    iq["type"] = "set"
    iq["id"] = "push1"
    iq["from"] = "mallory@example.test/x"
    iq["to"] = "alice@example.test/node"
    iq.enable("roster")
    reply = stranger_push_reply(iq, "alice@example.test")
    text = str(reply)
    assert 'type="error"' in text and "service-unavailable" in text and 'id="push1"' in text, text
    assert 'to="mallory@example.test/x"' in text, text
    iq["from"] = "alice@example.test"
    assert stranger_push_reply(iq, "alice@example.test") is None
