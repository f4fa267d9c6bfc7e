"""One XMPP connection (slixmpp): STARTTLS with a verified server certificate, SASL login,
our namespaced element, keepalive pings. A fresh connection object per attempt: the session's
own loop does reconnects and back-off (slixmpp's built-in reconnect would back off up to 300 s
and race with ours)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Callable

import slixmpp
from slixmpp.stanza import Message
from slixmpp.xmlstream import ElementBase, register_stanza_plugin
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from ..errors import IpopError
from .config import SignalingConfig
from .protocol import ELEMENT, NAMESPACE

log = logging.getLogger(__name__)


class SignalingError(IpopError):
    """The XMPP session cannot work as configured (a one-line message for the user)."""


class AuthFailed(SignalingError):
    pass


class TlsFailed(SignalingError):
    pass


class ConnectFailed(SignalingError):
    """The server is unreachable or went away (retried with back-off)."""


class IpswElement(ElementBase):
    """<ipsw xmlns="urn:ipop-switch:signaling:1" sig="..."/>: base64 envelope as text."""
    name = ELEMENT
    namespace = NAMESPACE
    plugin_attrib = ELEMENT
    interfaces = {"sig"}


register_stanza_plugin(Message, IpswElement)

# on_element(from_jid_full, element_text, sig_attr)
ElementHandler = Callable[[slixmpp.JID, str | None, str | None], None]


class XmppConnection:
    def __init__(self, cfg: SignalingConfig, on_element: ElementHandler,
                 endpoint: tuple[str, int] | None = None) -> None:
        self.cfg = cfg
        self.endpoint = endpoint or cfg.endpoints()[0]     # (host, port) this connection goes to
        self.client = slixmpp.ClientXMPP(f"{cfg.jid}/{cfg.resource}" if cfg.resource else cfg.jid, cfg.password)
        c = self.client
        c.enable_direct_tls = False      # STARTTLS on 5222, as XMPP servers do by default
        c.enable_plaintext = False       # never log in without TLS
        c.ssl_context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        c.ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        c.whitespace_keepalive = False   # our own ping below detects dead servers
        # never answer presence subscription requests: the user's roster is the user's (a GroupVPN
        # session on an account used for a SocialVPN too would otherwise accept every stranger)
        c.auto_authorize = None
        c.auto_subscribe = False
        c.register_plugin("xep_0030")
        c.register_plugin("xep_0045")
        c.register_plugin("xep_0199")
        c.register_handler(Callback("ipsw", StanzaPath(f"message/{ELEMENT}"), self._on_message))
        # slixmpp's filter of roster pushes (RFC 6121 2.1.6: only from our own account) answers
        # a stranger's push with an error whose legacy code it sets as an int, which fails to
        # serialise ("Exception raised in send queue: TypeError", no reply): the same filter,
        # with a reply that goes out
        c.remove_handler("Roster Update")
        c.register_handler(Callback("Roster Update", StanzaPath("iq@type=set/roster"), self._roster_push))
        self.disconnected: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._on_element = on_element
        self._pinger: asyncio.Task | None = None
        c.add_event_handler("session_start", self._session_start)
        c.add_event_handler("failed_auth", lambda _: self._fail(AuthFailed(
            f"XMPP login as {cfg.jid} refused: not authorized (check the password)")))
        c.add_event_handler("ssl_invalid_chain", lambda e: self._fail(TlsFailed(
            f"XMPP server {self.host}: TLS certificate not trusted"
            f"{' by ' + str(cfg.ca_file) if cfg.ca_file else ''} ({getattr(e, 'reason', e)})")))
        c.add_event_handler("connection_failed", lambda e: self._fail(ConnectFailed(
            f"XMPP server {self.where} unreachable ({e})")))
        c.add_event_handler("disconnected", self._disconnected)

    @property
    def host(self) -> str:
        return self.endpoint[0]

    @property
    def where(self) -> str:
        return f"{self.endpoint[0]}:{self.endpoint[1]}"

    @property
    def jid(self) -> slixmpp.JID:
        return self.client.boundjid

    def _fail(self, err: SignalingError) -> None:
        if not self._outcome.done():
            self._outcome.set_exception(err)
        self.close()

    def _session_start(self, _event) -> None:
        ssl_obj = self.client.transport.get_extra_info("ssl_object") if self.client.transport else None
        if ssl_obj is None:
            self._fail(TlsFailed(f"XMPP server {self.host}: session without TLS refused"))
            return
        if not self._outcome.done():
            self._outcome.set_result(None)
        self._pinger = asyncio.ensure_future(self._keepalive())

    def _disconnected(self, reason) -> None:
        if not self._outcome.done():
            if isinstance(reason, ssl.SSLError):  # the TLS handshake failed: slixmpp reports it here first
                self._outcome.set_exception(TlsFailed(
                    f"XMPP server {self.host}: TLS certificate not trusted"
                    f"{' by ' + str(self.cfg.ca_file) if self.cfg.ca_file else ''} ({reason.reason or reason})"))
            else:
                self._outcome.set_exception(ConnectFailed(f"XMPP server {self.host} closed the connection ({reason})"))
        if not self.disconnected.done():
            self.disconnected.set_result(str(reason or "connection lost"))
        if self._pinger:
            self._pinger.cancel()

    async def connect(self) -> None:
        """Connect, STARTTLS, log in; raise AuthFailed / TlsFailed / ConnectFailed."""
        self.client.connect(*self.endpoint)
        try:
            await asyncio.wait_for(asyncio.shield(self._outcome), self.cfg.connect_timeout)
        except asyncio.TimeoutError:
            self.close()
            raise ConnectFailed(f"XMPP server {self.where}: no session within "
                                f"{self.cfg.connect_timeout:.0f}s") from None
        if self.cfg.initial_presence:
            self.client.send_presence()

    async def join_room(self, room: str, nick: str) -> None:
        await self.client.plugin["xep_0045"].join_muc_wait(slixmpp.JID(room), nick, maxstanzas=0,
                                                          timeout=self.cfg.connect_timeout)

    async def room_occupants(self, room: str) -> set[str]:
        """The occupants' nicks a MUC room lists (XEP-0045 6.5: disco#items on the room)."""
        iq = await self.client.plugin["xep_0030"].get_items(jid=slixmpp.JID(room), timeout=self.cfg.connect_timeout)
        return {slixmpp.JID(j).resource for j, _node, _name in iq["disco_items"]["items"] if slixmpp.JID(j).resource}

    def on(self, event: str, handler) -> None:
        self.client.add_event_handler(event, handler)

    def send_element(self, to: str, text: str, sig: str) -> None:
        msg = self.client.make_message(mto=to, mtype="chat")
        el = msg[ELEMENT]
        el["sig"] = sig
        el.xml.text = text
        msg.send()

    def _roster_push(self, iq) -> None:
        reply = stranger_push_reply(iq, self.client.boundjid.bare)
        if reply is not None:
            reply.send()
            return
        self.client.event("roster_update", iq)

    def _on_message(self, msg: Message) -> None:
        if msg["type"] == "error":
            log.debug("XMPP error for a message to %s: %s", msg["from"], msg["error"]["condition"])
            return
        el = msg[ELEMENT]
        self._on_element(msg["from"], el.xml.text, el.xml.get("sig"))

    async def _keepalive(self) -> None:
        """A ping every ``keepalive`` seconds; an unanswered one closes the connection so the
        session reconnects (a server that vanished without a FIN is noticed this way)."""
        while True:
            await asyncio.sleep(self.cfg.keepalive)
            try:
                await self.client.plugin["xep_0199"].ping(timeout=min(10.0, self.cfg.keepalive))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("XMPP keepalive to %s failed (%s): reconnecting", self.host, e)
                self.close()
                return

    def check_local_address(self) -> bool:
        """After the host's addresses changed: is our TCP connection's own address still the
        host's? If not (the host roamed), drop the connection now so the session reconnects
        from the new address at once, instead of when the keepalive next fails (up to
        ``keepalive`` + 10 s, while every link's ICE restart waits on signaling). True if kept."""
        tr = self.client.transport
        name = tr.get_extra_info("sockname") if tr else None
        if not name:
            return True
        probe = socket.socket(socket.AF_INET6 if ":" in name[0] else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind((name[0], 0))       # EADDRNOTAVAIL: the address is gone from the host
        except OSError:
            log.warning("XMPP connection's local address %s is gone: reconnecting", name[0])
            self.close()
            return False
        finally:
            probe.close()
        return True

    def close(self) -> None:
        """Drop the connection now (idempotent)."""
        c = self.client
        c.cancel_connection_attempt()
        if c.transport:
            c.abort()
        elif not self.disconnected.done():
            self.disconnected.set_result("closed")
        if self._pinger:
            self._pinger.cancel()
        # this client object is done for: stop its output task, which would otherwise linger forever
        filters = getattr(c, "_run_out_filters", None)
        if filters is not None and not filters.done():
            filters.cancel()

    async def aclose(self, wait: float = 1.0) -> None:
        """Close the stream politely (the room sees us leave at once), bounded by ``wait``."""
        if self.client.transport:
            try:
                await asyncio.wait_for(self.client.disconnect(wait=wait), wait + 0.5)
            except (asyncio.TimeoutError, Exception):
                pass
        self.close()


def stranger_push_reply(iq, own_bare: str):
    """The error reply to a roster push that is not from our own account (None: it is ours;
    a push without a from is the server's on our behalf)."""
    from_ = iq["from"]
    if not from_ or from_ == slixmpp.JID("") or from_ == own_bare:
        return None
    reply = iq.reply()
    reply["type"] = "error"
    reply["error"]["type"] = "cancel"
    reply["error"]["condition"] = "service-unavailable"
    return reply
