"""SocialVPN discovery: friends from the user's own XMPP roster (docs/social.md).

A *friend* is a roster contact with mutual presence subscription (``both``), as the server
says it (roster pushes are accepted from our own server only; slixmpp refuses others). A
friend's *node* is one of the friend's full JIDs whose presence carries our element
``<node xmlns="urn:ipop-switch:social:1" id="NODE ID" overlay="NAME"/>``: the resource is the
node's name, the id an untrusted hint like the MUC nick's in a GroupVPN. The user's own other
devices (same account, other resources) count as friends too.

What a discovery reports is still only a contact: the session verifies the announce's
self-signed certificate and signature, then ``vet`` (still a friend?) before the node becomes a
peer; whether the peer is trusted -- its key the pinned one -- the agent decides. Stanzas
from anyone else are not from a contact (``address_of`` is None): the session drops and
counts them (``foreign_source``); presences of non-friends carrying our element are counted
here (``not_friend``), malformed subscription stanzas too (``bad_subscription``), and roster
pushes from anyone but our own server (``foreign_roster_push``; slixmpp refuses them).

``SocialRoster`` is the roster's state shared by the agent and the discovery of the current
connection; it sends the subscription stanzas behind ``friends add/accept/remove``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Callable

import slixmpp
from slixmpp.stanza import Presence
from slixmpp.xmlstream import ElementBase, register_stanza_plugin
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from .discovery import ContactGone, ContactSeen
from .protocol import NODE_ID_RE
from .xmpp import SignalingError, XmppConnection

log = logging.getLogger(__name__)

SOCIAL_NS = "urn:ipop-switch:social:1"
BARE_RE = re.compile(r"^[a-z0-9._+-]{1,64}@[a-z0-9.-]{1,253}$")
RESOURCE_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class NodeElement(ElementBase):
    """<node xmlns="urn:ipop-switch:social:1" id="..." overlay="..."/> in our presence."""
    name = "node"
    namespace = SOCIAL_NS
    plugin_attrib = "ipsw_node"
    interfaces = {"id", "overlay"}


register_stanza_plugin(Presence, NodeElement)

def _bare(jid) -> str | None:
    b = str(getattr(jid, "bare", jid) or "").lower()
    return b if BARE_RE.match(b) else None


class SocialRoster:
    """The roster as the server says it (bare JID -> subscription), subscription requests waiting
    for ``accept``, and the commands. ``on_change`` runs after every roster change."""

    def __init__(self, own_jid: str, overlay: str, on_change: Callable[[], None] = lambda: None) -> None:
        self.own = own_jid.lower()
        self.overlay = overlay
        self.on_change = on_change
        self.items: dict[str, dict] = {}       # bare -> {"subscription": none|to|from|both, "ask": bool}
        self.requests: set[str] = set()        # they asked to see us; waiting for 'friends accept'
        self.drops: Counter[str] = Counter()
        self.conn: XmppConnection | None = None
        self.discovery: "SocialDiscovery | None" = None

    def is_friend(self, bare: str) -> bool:
        return bare == self.own or self.items.get(bare, {}).get("subscription") == "both"

    def subscription(self, bare: str) -> str:
        return self.items.get(bare, {}).get("subscription", "none")

    def sync(self) -> None:
        """Our view from slixmpp's roster (after it applied a push or the initial roster)."""
        conn = self.conn
        if conn is None:
            return
        roster = conn.client.client_roster
        items = {}
        for jid in roster:
            bare = _bare(jid)
            if bare is None or bare == self.own:
                continue
            it = roster[jid]
            sub = {(True, True): "both", (True, False): "to", (False, True): "from"}.get((it["to"], it["from"]), "none")
            items[bare] = {"subscription": sub, "ask": bool(it["pending_out"])}
        was = {b for b in self.items if self.is_friend(b)}
        self.items = items
        self.requests -= {b for b in self.requests if self.subscription(b) in ("from", "both")}
        if self.discovery is not None:
            for b in was - {b for b in items if self.is_friend(b)}:
                self.discovery.friend_gone(b)
        self.on_change()

    # -- commands (the CLI through the agent) ----------------------------------------------
    def _client(self) -> slixmpp.ClientXMPP:
        if self.conn is None or not self.conn.client.transport:
            raise SignalingError("not connected to the XMPP server: try again when the overlay is online")
        return self.conn.client

    def add(self, jid: str) -> str:
        """Ask to be friends (presence subscription); accepts at once if they asked first."""
        bare = _check(jid, self.own)
        if bare in self.requests:
            return self.accept(bare)
        self._client().send_presence_subscription(pto=bare, ptype="subscribe")
        return f"asked {bare} to be friends; they accept with 'ipop-switch friends accept {self.own}'"

    def accept(self, jid: str) -> str:
        bare = _check(jid, self.own)
        c = self._client()
        c.send_presence_subscription(pto=bare, ptype="subscribed")
        if self.subscription(bare) not in ("to", "both"):
            c.send_presence_subscription(pto=bare, ptype="subscribe")
        self.requests.discard(bare)
        return f"accepted {bare}"

    def remove(self, jid: str) -> str:
        bare = _check(jid, self.own)
        c = self._client()
        c.send_presence_subscription(pto=bare, ptype="unsubscribed")
        c.send_presence_subscription(pto=bare, ptype="unsubscribe")
        c.del_roster_item(bare)
        self.requests.discard(bare)
        if self.discovery is not None:
            self.discovery.friend_gone(bare)   # at once: the server's push follows
        return f"removed {bare}"


def _check(jid: str, own: str) -> str:
    bare = _bare(str(jid).split("/", 1)[0])
    if bare is None:
        raise SignalingError(f"{jid!r} is not a JID (user@domain)")
    if bare == own:
        raise SignalingError("that is your own account: your other devices are linked already")
    return bare


class SocialDiscovery:
    """``Discovery`` over the roster: contacts are friends' nodes (full JIDs with our element)."""

    def __init__(self, roster: SocialRoster, node_id: str) -> None:
        self.roster = roster
        self.node_id = node_id
        self.contacts: dict[str, str] = {}   # full JID -> node id hint from its presence
        self._own = ""
        self._gone: ContactGone = lambda a: None

    async def start(self, conn: XmppConnection, seen: ContactSeen, gone: ContactGone) -> None:
        c = conn.client
        c.auto_authorize = None            # subscription requests are the user's decision
        c.auto_subscribe = False
        self._own, self._gone = str(conn.jid), gone
        self.roster.conn, self.roster.discovery = conn, self

        def available(pres) -> None:
            full, el = str(pres["from"]), pres["ipsw_node"]
            node_id, overlay = el["id"], el["overlay"]
            if not node_id or full == self._own:
                return                          # not one of ours (an ordinary client), or ourselves
            bare, _, res = full.partition("/")
            if overlay != self.roster.overlay:
                return                          # a node of another social overlay of this friend
            if not self.roster.is_friend(_bare(bare) or ""):
                self.roster.drops["not_friend"] += 1
                return
            if not NODE_ID_RE.match(node_id) or not RESOURCE_RE.match(res):
                self.roster.drops["malformed_presence"] += 1
                return
            self.contacts[full] = node_id
            seen(full, node_id)

        def unavailable(pres) -> None:
            full = str(pres["from"])
            if self.contacts.pop(full, None) is not None:
                gone(full)

        def subscription(pres) -> None:
            bare = _bare(pres["from"])
            if bare is None or pres["to"].bare.lower() != self.roster.own:
                self.roster.drops["bad_subscription"] += 1
                return
            if pres["type"] == "subscribe":
                sub = self.roster.subscription(bare)
                item = self.roster.items.get(bare, {})
                if sub in ("to", "both") or item.get("ask"):   # we asked them: their asking back completes it
                    c.send_presence_subscription(pto=bare, ptype="subscribed")
                elif sub != "from":
                    self.roster.requests.add(bare)
                    log.info("event=friend_request from=%s (accept with 'ipop-switch friends accept %s')", bare, bare)

        conn.on("presence_available", available)
        conn.on("presence_unavailable", unavailable)
        conn.on("changed_subscription", subscription)
        conn.on("roster_update", lambda _iq: self.roster.sync())

        def foreign_push(iq) -> None:   # slixmpp answers it with an error and ignores it: we count it
            if iq["from"].bare and iq["from"].bare.lower() != self.roster.own:
                self.roster.drops["foreign_roster_push"] += 1
        c.register_handler(Callback("ipsw foreign roster push", StanzaPath("iq@type=set/roster"), foreign_push))
        await c.get_roster(timeout=conn.cfg.connect_timeout)
        self.roster.sync()
        pres = c.make_presence()
        pres["ipsw_node"]["id"] = self.node_id
        pres["ipsw_node"]["overlay"] = self.roster.overlay
        pres.send()                             # initial presence: the server answers with friends' presences

    def friend_gone(self, bare: str) -> None:
        for full in [f for f in self.contacts if f.split("/", 1)[0].lower() == bare]:
            del self.contacts[full]
            self._gone(full)

    def address_of(self, source: slixmpp.JID) -> str | None:
        full = str(source)
        return full if full in self.contacts and self.roster.is_friend(_bare(source) or "") else None

    @property
    def own_address(self) -> str:
        return self._own

    def hint(self, address: str) -> str | None:
        return self.contacts.get(address)

    def vet(self, address: str, peer) -> str | None:
        """After the announce's certificate and signature verified: only friends' nodes become
        peers. Whether a friend's node is trusted (its pinned key) is the agent's decision, made
        on the peer it is given: a refused node stays known, so 'friends forget' can re-pin it
        at once without waiting for another announce."""
        bare = _bare(address.partition("/")[0]) or ""
        return None if self.roster.is_friend(bare) else "not_friend"

    def describe(self) -> str:
        return f"roster of {self.roster.own} as {self._own}"
