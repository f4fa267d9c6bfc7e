"""Finding the overlay's members on the XMPP server, and addressing them.

A discovery reports *contacts*: XMPP addresses where a member of the overlay may be,
with an untrusted hint of its node id. Nothing a discovery says is trusted: a contact
becomes a peer only after it sent an announcement signed by a key whose certificate verifies.

GroupVPN uses ``MucDiscovery``: every member joins one multi-user chat room per overlay (as
IPOP's GroupVPN admin tool did). Why a room and not the roster: membership needs no
per-pair subscriptions (an N-member roster needs N*(N-1) approvals, and every account a
roster of all others), a new member is seen by all at once through the room's presence
broadcast, and the room disappears when the last member leaves. The room is not a trust
boundary: anyone who can join it is just another contact until it proves a certificate.
SocialVPN (a later issue) fits the same ``Discovery`` protocol with the roster: contacts
are mutual roster subscriptions, addresses are full JIDs, the hint comes from presence.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Callable, Protocol

import slixmpp

from .protocol import NODE_ID_RE
from .xmpp import XmppConnection

ContactSeen = Callable[[str, str | None], None]   # (address, node id hint)
ContactGone = Callable[[str], None]               # (address)


class Discovery(Protocol):
    async def start(self, conn: XmppConnection, seen: ContactSeen, gone: ContactGone) -> None:
        """Join/subscribe; report contacts present now and later (may call ``seen`` before returning)."""

    def address_of(self, source: slixmpp.JID) -> str | None:
        """The contact address a received stanza came from, or None if not from a contact."""

    @property
    def own_address(self) -> str:
        """Our own address as contacts see it."""

    def hint(self, address: str) -> str | None:
        """The node id a contact address claims (untrusted; a signed announce must match it)."""

    def describe(self) -> str: ...


class MucDiscovery:
    """One MUC room per overlay. Our nick is ``<node id>.<4 hex>``: the node id part is the
    (untrusted) hint others address us by; the random part keeps a reconnecting node from
    colliding with its own ghost still in the room."""

    def __init__(self, room_jid: str, node_id: str) -> None:
        self.room = slixmpp.JID(room_jid).bare
        self.nick = f"{node_id}.{secrets.token_hex(2)}"
        self.present: set[str] = set()       # occupants' nicks as the room's presences told us

    async def start(self, conn: XmppConnection, seen: ContactSeen, gone: ContactGone) -> None:
        def online(pres) -> None:
            nick = pres["muc"]["nick"]
            if nick:
                self.present.add(nick)
            if nick and nick != self.nick:
                seen(f"{self.room}/{nick}", hint_of(nick))

        def offline(pres) -> None:
            nick = pres["muc"]["nick"]
            self.present.discard(nick)
            if nick and nick != self.nick:
                gone(f"{self.room}/{nick}")

        conn.on(f"muc::{self.room}::got_online", online)
        conn.on(f"muc::{self.room}::got_offline", offline)
        await conn.join_room(self.room, self.nick)

    async def check(self, conn: XmppConnection, confirm_after: float = 2.0) -> str | None:
        """Is the room the server routes to the one we sit in? It lists its occupants (disco
        items of a public room): we must be among them, and everyone it lists must have reached
        us as a presence. The same difference on a second look ``confirm_after`` seconds later
        (presences may be on their way) is a split room: a reason; else None. A server that
        lists nobody tells nothing."""
        first: set[str] | None = None
        for _ in range(2):
            listed = await conn.room_occupants(self.room)
            if not listed:
                return None
            if self.nick not in listed:
                why = {f"not among the {len(listed)} occupants the server lists"}
            else:
                why = {f"occupant {n} never seen" for n in listed - self.present}
            if not why:
                return None
            if first is not None and why & first:
                both = sorted(why & first)
                return both[0] + (f" (+{len(both) - 1})" if len(both) > 1 else "")
            first = why
            await asyncio.sleep(confirm_after)
        return None

    def address_of(self, source: slixmpp.JID) -> str | None:
        if source.bare != self.room or not source.resource or source.resource == self.nick:
            return None
        return f"{self.room}/{source.resource}"

    @property
    def own_address(self) -> str:
        return f"{self.room}/{self.nick}"

    def hint(self, address: str) -> str | None:
        return hint_of(address.rpartition("/")[2])

    def describe(self) -> str:
        return f"{self.room} as {self.nick}"


def hint_of(nick: str) -> str | None:
    head = nick.split(".", 1)[0]
    return head if NODE_ID_RE.match(head) else None
