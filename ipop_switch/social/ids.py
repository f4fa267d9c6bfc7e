"""Friends' names as the rest of the social code keys on them: a bare JID and a node name
(the XMPP resource a friend's node logs in with). Checked once at the edge, so a roster push
or a presence with a hostile JID can never become a file key, a hosts line or a port name."""

from __future__ import annotations

import re

from .store import SocialStateError

# user@domain, lowercased; no resource. Deliberately narrower than RFC 7622 (what ordinary
# servers hand out): the bare JID ends up in hosts-file names and JSON keys.
BARE_JID_RE = re.compile(r"^[a-z0-9._+-]{1,64}@[a-z0-9.-]{1,253}$")
# a node is its resource: one DNS label, so <node>.<friend>.<suffix> is a valid host name
NODE_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class BadName(SocialStateError):
    """A JID or node name we do not accept (counted as malformed by the caller)."""


def bare_jid(text: str) -> str:
    """'Bob@Lab.Example/laptop' -> 'bob@lab.example' (the resource is dropped)."""
    bare = str(text).split("/", 1)[0].strip().lower()
    if not BARE_JID_RE.match(bare) or ".." in bare:
        raise BadName(f"{text!r} is not a JID (user@domain)")
    return bare


def node_name(text: str) -> str:
    """A node (resource) name: one DNS label (a-z, 0-9, '-'), lowercased."""
    name = str(text).strip().lower()
    if not NODE_RE.match(name):
        raise BadName(f"{text!r} is not a node name (a-z, 0-9 and '-', at most 63)")
    return name


def split_full(jid: str) -> tuple[str, str]:
    """'bob@lab/laptop' -> ('bob@lab', 'laptop'); BadName without a valid resource."""
    bare, sep, res = str(jid).partition("/")
    if not sep:
        raise BadName(f"{jid!r} has no resource (user@domain/node)")
    return bare_jid(bare), node_name(res)


def friend_label(bare: str) -> str:
    """The friend's part of host names: the JID's user part made a DNS label."""
    user = bare.split("@", 1)[0]
    label = re.sub(r"[^a-z0-9-]+", "-", user).strip("-")[:63].strip("-")
    return label or "friend"
