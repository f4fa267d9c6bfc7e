"""Log in to the lab's Prosody with slixmpp over STARTTLS, verifying the server
certificate against the lab CA. Prints one JSON line: {"ok": bool, "error": str}.
Run inside a lab host's namespace."""

import asyncio
import json
import ssl
import sys

import slixmpp


async def login(jid: str, password: str, host: str, ca: str, timeout: float) -> dict:
    xmpp = slixmpp.ClientXMPP(jid, password)
    xmpp.enable_direct_tls = False
    xmpp.enable_plaintext = False
    xmpp.ssl_context = ssl.create_default_context(cafile=ca)
    done: asyncio.Future = asyncio.get_running_loop().create_future()
    def started(_):
        tls = xmpp.transport is not None and xmpp.transport.get_extra_info("ssl_object") is not None
        done.done() or done.set_result({"ok": True, "error": "", "tls": tls})

    xmpp.add_event_handler("session_start", started)
    xmpp.add_event_handler("failed_auth", lambda _: done.done() or done.set_result({"ok": False, "error": "auth"}))
    xmpp.add_event_handler("ssl_invalid_chain", lambda e: done.done() or done.set_result({"ok": False, "error": "tls"}))
    xmpp.add_event_handler("connection_failed", lambda e: done.done() or done.set_result({"ok": False, "error": f"connect: {e}"}))
    xmpp.connect(host, 5222)
    try:
        res = await asyncio.wait_for(done, timeout)
    except asyncio.TimeoutError:
        res = {"ok": False, "error": "timeout"}
    xmpp.disconnect()
    await asyncio.sleep(0.1)
    return res


if __name__ == "__main__":
    jid, pw, host, ca = sys.argv[1:5]
    print(json.dumps(asyncio.run(login(jid, pw, host, ca, 15.0))), flush=True)
