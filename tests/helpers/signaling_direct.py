"""Signaling sessions of one group fed directly, without an XMPP server: what a session
hands to the server is kept (``Wire``), and an element is given to the session's receive
path as ``_on_element`` would give it (drops counted by reason). For unit tests of what
the server sees and of the receive checks; the lab tests run the same sessions over Prosody."""

from __future__ import annotations

import time
from pathlib import Path

from ipop_switch.identity.ca import GroupCA
from ipop_switch.identity.store import NodeIdentity
from ipop_switch.signaling.config import SignalingConfig
from ipop_switch.signaling.protocol import Drop
from ipop_switch.signaling.session import PeerRecord, SignalingSession


class Wire:
    """Stands where the XMPP connection stands and keeps what the server would be handed."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self.client = type("Client", (), {"transport": True})()

    def send_element(self, address: str, text: str, sig: str) -> None:
        self.sent.append((address, text, sig))


def members(d: Path, names: tuple[str, ...] = ("a", "b"), overlay: str = "blue") -> list[SignalingSession]:
    """Sessions of members of one group, each knowing every other (as after their announces)."""
    group = GroupCA.create(d / "ca", overlay)
    out = []
    for name in names:
        ident = NodeIdentity.create(d / name)
        ident.install(group.bundle(group.issue(ident.request())))
        s = SignalingSession(ident.membership(overlay), SignalingConfig(jid=f"{name}@x.test", password="p"))
        s._conn = Wire()
        out.append(s)
    for x in out:
        for y in out:
            if x is not y:
                x._peers[y.node_id] = PeerRecord(y.identity.own, {}, f"room/{y.node_id}", 0, time.monotonic())
    return out


def deliver(s: SignalingSession, text: str | None, sig: str | None) -> tuple[str | None, list]:
    """An element from the room to ``s``: (drop reason or None, the events it emitted)."""
    reason = None
    try:
        s._receive(f"room/{s.node_id}", text, sig)
    except Drop as d:
        reason = d.reason
        s.drops.add(d.reason, d.detail, "room")
    events = []
    while not s._events.empty():
        events.append(s._events.get_nowait())
    return reason, events
