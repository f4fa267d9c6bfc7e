"""Trust on first use for friends' nodes: (friend, node) -> the fingerprint of the node's own
key, pinned the first time it is seen and never silently replaced.

Why pin the key and not the certificate: a node re-issues its self-signed certificate (new
validity, new tunnel key) without becoming someone else; a new *signing key* is a new
identity, which is exactly what must be refused until the user says so (``friends forget``).
A refusal is loud: counted per node, the offered fingerprint kept for ``friends list``, and
the caller logs it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from .ids import bare_jid, node_name
from .store import SocialStateError, load_json, save_json

FP_CHARS = set("0123456789abcdef")


def normal_fp(text: str) -> str:
    """A fingerprint as 64 lowercase hex chars (colons and spaces ignored), for comparison."""
    h = "".join(c for c in str(text).lower() if c not in ": ")
    if len(h) != 64 or not set(h) <= FP_CHARS:
        raise SocialStateError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
    return h


def show_fp(fp: str) -> str:
    """Hex in groups of four, as people read them out to each other."""
    h = normal_fp(fp)
    return ":".join(h[i:i + 4] for i in range(0, 64, 4))


class Verdict(Enum):
    PINNED = "pinned"      # first sight: pinned now
    MATCH = "match"        # the pinned key
    CHANGED = "changed"    # another key for a pinned node: refused


@dataclass
class Pin:
    fingerprint: str
    node_id: str
    pinned_at: float
    verified: bool = False


@dataclass
class Refusal:
    """A key offered for a pinned node that is not the pinned one (shown until forgotten)."""
    fingerprint: str
    count: int = 0
    last: float = 0.0


@dataclass
class PinStore:
    """The pins of one node, persisted as JSON in its identity/state directory."""

    path: Path
    pins: dict[tuple[str, str], Pin] = field(default_factory=dict)
    refused: dict[tuple[str, str], Refusal] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "PinStore":
        data = load_json(path, "friend pins") or {}
        store = cls(Path(path))
        try:
            for key, p in data.get("pins", {}).items():
                jid, _, node = key.rpartition("/")
                store.pins[(bare_jid(jid), node_name(node))] = Pin(
                    normal_fp(p["fingerprint"]), str(p["node_id"]), float(p["pinned_at"]), bool(p.get("verified")))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SocialStateError(f"friend pins {path}: bad entry ({e}); move the file away to start afresh") from None
        return store

    def save(self) -> None:
        save_json(self.path, {"pins": {f"{j}/{n}": asdict(p) for (j, n), p in sorted(self.pins.items())}})

    def check(self, jid: str, node: str, fingerprint: str, node_id: str, *, now: float | None = None) -> Verdict:
        """The verdict on a node's key; a first sight is pinned (and saved) at once."""
        key = (bare_jid(jid), node_name(node))
        fp = normal_fp(fingerprint)
        pin = self.pins.get(key)
        now = time.time() if now is None else now
        if pin is None:
            self.pins[key] = Pin(fp, node_id, now)
            self.refused.pop(key, None)
            self.save()
            return Verdict.PINNED
        if pin.fingerprint == fp:
            return Verdict.MATCH
        r = self.refused.get(key)
        if r is None or r.fingerprint != fp:
            r = self.refused[key] = Refusal(fp)
        r.count += 1
        r.last = now
        return Verdict.CHANGED

    def verify(self, jid: str, fingerprint: str) -> list[str]:
        """Mark the friend's node(s) pinned with this fingerprint as verified out of band;
        their node names. An error if none matches (a typo must not look like success)."""
        bare, fp = bare_jid(jid), normal_fp(fingerprint)
        hit = [n for (j, n), p in self.pins.items() if j == bare and p.fingerprint == fp]
        if not hit:
            raise SocialStateError(f"no node of {bare} is pinned with fingerprint {show_fp(fp)}: "
                                   "compare with 'ipop-switch friends list'")
        for n in hit:
            self.pins[(bare, n)].verified = True
        self.save()
        return sorted(hit)

    def forget(self, jid: str, node: str) -> bool:
        """Drop a node's pin (and its refusals): its next key is pinned afresh. True if there was one."""
        key = (bare_jid(jid), node_name(node))
        had = self.pins.pop(key, None) is not None
        self.refused.pop(key, None)
        if had:
            self.save()
        return had

    def of(self, jid: str) -> dict[str, Pin]:
        bare = bare_jid(jid)
        return {n: p for (j, n), p in self.pins.items() if j == bare}
