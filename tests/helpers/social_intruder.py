"""A stranger's plain slixmpp client (none of our session code) that pokes a SocialVPN node it
is not a friend of. Run in a lab host's namespace with one argument: a JSON file
    {"jid", "password", "server", "ca", "target_jid": the node's full JID, "overlay",
     "claims": a node id to claim (a friend's, say)}
Sends: a directed presence carrying our <node/> element (-> not_friend), a signed announce
message naming the claimed node id under another key (-> foreign_source: not from a contact),
an unsolicited 'subscribed' (must not make us friends), a roster push saying we are friends
(-> foreign_roster_push). Prints {"sent": n} or {"error": ...}."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import ssl
import sys
from pathlib import Path

import slixmpp
from cryptography.hazmat.primitives.asymmetric import ed25519

from ipop_switch.signaling.protocol import ELEMENT, NAMESPACE, Envelope, encode
from ipop_switch.signaling.social import SOCIAL_NS


async def main(c: dict) -> dict:
    xmpp = slixmpp.ClientXMPP(c["jid"] + "/intruder", c["password"])
    xmpp.enable_direct_tls = False
    xmpp.enable_plaintext = False
    xmpp.ssl_context = ssl.create_default_context(cafile=c["ca"])
    loop = asyncio.get_running_loop()
    started: asyncio.Future = loop.create_future()
    xmpp.add_event_handler("session_start", lambda _: started.done() or started.set_result(True))
    xmpp.add_event_handler("failed_auth", lambda _: started.done() or started.set_exception(RuntimeError("auth")))
    xmpp.connect(c["server"], 5222)
    await asyncio.wait_for(started, 10)
    to, nid = c["target_jid"], secrets.token_hex(16)
    xmpp.send_raw(f'<presence to="{to}"><node xmlns="{SOCIAL_NS}" id="{nid}" overlay="{c["overlay"]}"/></presence>')
    key = ed25519.Ed25519PrivateKey.generate()
    text, sig = encode(Envelope(c["overlay"], c["claims"], nid, "announce",
                                {"cert": base64.b64encode(b"x" * 40).decode(), "caps": {}}), key.sign)
    xmpp.send_raw(f'<message to="{to}" type="chat"><{ELEMENT} xmlns="{NAMESPACE}" sig="{sig}">{text}</{ELEMENT}></message>')
    xmpp.send_raw(f'<presence to="{to.split("/")[0]}" type="subscribed"/>')
    # a roster push from a stranger: "we are friends" (only our own server may push our roster)
    xmpp.send_raw(f'<iq to="{to}" type="set" id="{secrets.token_hex(4)}"><query xmlns="jabber:iq:roster">'
                  f'<item jid="{c["jid"]}" subscription="both"/></query></iq>')
    await asyncio.sleep(1.0)
    xmpp.disconnect()
    await asyncio.sleep(0.2)
    return {"sent": 4}


if __name__ == "__main__":
    conf = json.loads(Path(sys.argv[1]).read_text())
    try:
        res = asyncio.run(asyncio.wait_for(main(conf), 30))
    except Exception as e:
        res = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(res), flush=True)
