"""A hostile XMPP client (a plain slixmpp session, none of our session code) that joins an overlay's
room and sends a target node forged, replayed, stale, wrong-overlay, oversized and malformed
messages. Run in a lab host's namespace with one argument: a JSON file
    {"jid", "password", "server", "ca", "room", "overlay", "target": node id, "target_jid": bare JID,
     "captured": identity dir of a real member (its messages are "captured" and replayed),
     "other_member": node id of another member, "bad_certs": {"untrusted_cert"|"expired"|"revoked": identity dir}}
Prints one JSON line: {"sent": {expected drop reason: count}, "accepted": n} (or {"error": ...})."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import ssl
import sys
import time
from pathlib import Path

import slixmpp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ipop_switch.identity import NodeIdentity
from ipop_switch.signaling.protocol import ELEMENT, NAMESPACE, Envelope, encode, json_bytes, sign_input
from ipop_switch.signaling.seal import info_of, seal

NS = NAMESPACE


def element(text: str, sig: str | None) -> str:
    s = f' sig="{sig}"' if sig is not None else ""
    return f'<{ELEMENT} xmlns="{NS}"{s}>{text}</{ELEMENT}>'


def raw_message(obj: dict, key) -> tuple[str, str]:
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return base64.b64encode(raw).decode(), base64.b64encode(key.sign(sign_input(raw))).decode()


def plan(c: dict) -> list[tuple[str, str, str | None, bool]]:
    """(expected reason, text, sig, to the room occupant? else to the target's own JID)."""
    me = NodeIdentity.load(Path(c["captured"]))
    ov, tgt, snd = c["overlay"], c["target"], me.node_id
    rnd = ed25519.Ed25519PrivateKey.generate()
    out: list[tuple[str, str, str | None, bool]] = []

    def env(**kw) -> Envelope:
        base = dict(overlay=ov, sender=snd, recipient=tgt, type="probe", body={"n": len(out)})
        base.update(kw)
        return Envelope(**base)

    # a genuine message ("captured"), its body sealed to the target as members seal every body
    ok_body = seal(json_bytes({"n": 0}), bytes.fromhex(c["target_tunnel"]), info_of(ov, snd, tgt, "probe"))
    ok_text, ok_sig = encode(env(body=ok_body), me.sign)
    out.append(("accepted", ok_text, ok_sig, True))
    out.append(("replayed", ok_text, ok_sig, True))                     # the same bytes again
    out.append(("stale", *encode(env(ts_ms=int(time.time() * 1000) - 600_000), me.sign), True))
    out.append(("wrong_overlay", *encode(env(overlay="other-net"), me.sign), True))
    out.append(("wrong_recipient", *encode(env(recipient=c["other_member"]), me.sign), True))
    out.append(("bad_signature", *encode(env(), rnd.sign), True))      # forged: claims the member, other key
    t, s = encode(env(body={"x": "y" * 10}), me.sign)                   # tampered after signing
    raw = bytearray(base64.b64decode(t))
    raw[raw.index(b"yyy")] = ord("z")
    out.append(("bad_signature", base64.b64encode(bytes(raw)).decode(), s, True))
    out.append(("unsigned", ok_text, None, True))
    out.append(("oversized", "A" * 40_000, ok_sig, True))
    out.append(("malformed", "!!not base64!!", ok_sig, True))
    out.append(("malformed", base64.b64encode(b"not json at all").decode(), ok_sig, True))
    out.append(("malformed", *raw_message({"v": 1, "ov": ov, "from": snd}, me.signing_key), True))
    out.append(("bad_version", *raw_message({"v": 2, "ov": ov, "from": snd, "to": tgt, "type": "probe",
                                             "ts": int(time.time() * 1000), "nonce": secrets.token_hex(16),
                                             "body": {}}, me.signing_key), True))
    out.append(("unknown_sender", *encode(env(sender=secrets.token_hex(16)), rnd.sign), True))
    cert = base64.b64encode(me.membership(c["overlay"]).cert_der).decode()
    # the member's own announce, as if captured from its exchange with another occupant, forwarded from
    # our room address (whose nick claims the member's node id)
    captured_announce = {"cert": cert, "caps": {}, "from_addr": f"{c['room']}/{me.node_id}.real",
                         "to_addr": f"{c['room']}/{tgt}.other"}
    out.append(("wrong_address", *encode(env(type="announce", body=captured_announce), me.sign), True))
    # the member's certificate in an announce claiming to come from another member
    out.append(("sender_mismatch", *encode(env(sender=c["other_member"], type="announce",
                                               body={"cert": cert, "caps": {}}), me.sign), True))
    for reason, d in c["bad_certs"].items():
        bad = NodeIdentity.load(Path(d))
        bad_cert = (bad.group_dir(ov) / "node.crt").read_bytes()
        der = x509.load_pem_x509_certificate(bad_cert).public_bytes(serialization.Encoding.DER)
        out.append((reason, *encode(env(sender=bad.node_id, type="announce",
                                        body={"cert": base64.b64encode(der).decode(), "caps": {}}), bad.sign), True))
    out.append(("foreign_source", *encode(env(), me.sign), False))     # straight to its JID, not via the room
    return out


async def main(c: dict) -> dict:
    xmpp = slixmpp.ClientXMPP(c["jid"], c["password"])
    xmpp.enable_direct_tls = False
    xmpp.enable_plaintext = False
    xmpp.ssl_context = ssl.create_default_context(cafile=c["ca"])
    xmpp.register_plugin("xep_0045")
    loop = asyncio.get_running_loop()
    started: asyncio.Future = loop.create_future()
    xmpp.add_event_handler("session_start", lambda _: started.done() or started.set_result(True))
    xmpp.add_event_handler("failed_auth", lambda _: started.done() or started.set_exception(RuntimeError("auth")))
    target_nick: asyncio.Future = loop.create_future()

    def occupant(pres) -> None:
        nick = pres["muc"]["nick"]
        if nick.startswith(c["target"]) and not target_nick.done():
            target_nick.set_result(nick)

    room = c["room"]
    xmpp.add_event_handler(f"muc::{room}::got_online", occupant)
    xmpp.connect(c["server"], 5222)
    await asyncio.wait_for(started, 10)
    xmpp.send_presence()
    # our nick claims the captured member's node id (occupants cannot be stopped from choosing nicks)
    me = NodeIdentity.load(Path(c["captured"])).node_id
    await xmpp.plugin["xep_0045"].join_muc_wait(slixmpp.JID(room), me + ".beef",
                                                maxstanzas=0, timeout=10)
    nick = await asyncio.wait_for(target_nick, 10)
    sent: dict[str, int] = {}
    for reason, text, sig, via_room in plan(c):
        to = f"{room}/{nick}" if via_room else c["target_jid"]
        xmpp.send_raw(f'<message to="{to}" type="chat" id="{secrets.token_hex(4)}">{element(text, sig)}</message>')
        sent[reason] = sent.get(reason, 0) + 1
        await asyncio.sleep(0.02)
    await asyncio.sleep(1.0)
    xmpp.disconnect()
    await asyncio.sleep(0.2)
    return {"sent": {k: v for k, v in sent.items() if k != "accepted"}, "accepted": sent.get("accepted", 0)}


if __name__ == "__main__":
    conf = json.loads(Path(sys.argv[1]).read_text())
    try:
        res = asyncio.run(asyncio.wait_for(main(conf), 40))
    except Exception as e:
        res = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(res), flush=True)
