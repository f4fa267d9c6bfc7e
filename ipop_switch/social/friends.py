"""The friend list: which friends we have (from the roster), which of their nodes we have seen,
and what each node's state is. Pure: the agent feeds it events and acts on ``wanted()``.

A friend is a roster contact with mutual subscription (``both``). A friend's node is one of
their full JIDs announcing our capability. Node states:
  pending   seen and trusted (pin matches or just pinned), no link up yet
  linked    the link is up
  refused   its key is not the pinned one (until ``friends forget``), or it is not a friend's
Nodes of contacts that are not (or no longer) friends are never wanted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .ids import bare_jid, node_name
from .pins import PinStore, Verdict

SUBSCRIPTIONS = ("none", "to", "from", "both", "remove")


class NodeState(Enum):
    PENDING = "pending"
    LINKED = "linked"
    REFUSED = "refused"


@dataclass
class FriendNode:
    jid: str
    node: str
    node_id: str
    fingerprint: str
    state: NodeState = NodeState.PENDING
    reason: str = ""


@dataclass
class Friend:
    jid: str
    subscription: str = "none"   # the roster's: none / to / from / both
    ask: bool = False            # our subscription request is out, unanswered

    @property
    def is_friend(self) -> bool:
        return self.subscription == "both"


@dataclass
class FriendList:
    """Friends and their nodes; the pins decide trust. Drops are counted by reason."""

    pins: PinStore
    friends: dict[str, Friend] = field(default_factory=dict)
    nodes: dict[tuple[str, str], FriendNode] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def roster(self, jid: str, subscription: str, *, ask: bool = False) -> bool:
        """A roster item (initial roster or push). True if the friend set changed."""
        bare = bare_jid(jid)
        if subscription not in SUBSCRIPTIONS:
            self._drop("bad_subscription")
            return False
        was = self.friends.get(bare)
        was_friend = bool(was and was.is_friend)
        if subscription == "remove":
            self.friends.pop(bare, None)
        else:
            self.friends[bare] = Friend(bare, subscription, ask)
        now_friend = subscription == "both"
        if was_friend and not now_friend:
            for key in [k for k in self.nodes if k[0] == bare]:
                del self.nodes[key]
        return was_friend != now_friend

    def is_friend(self, jid: str) -> bool:
        f = self.friends.get(bare_jid(jid))
        return bool(f and f.is_friend)

    def node_seen(self, jid: str, node: str, node_id: str, fingerprint: str) -> NodeState:
        """A verified announce from jid/node (its signature checked against the key it carries).
        Non-friends are refused and counted (no state kept: a stranger cannot grow our memory);
        a friend's node is pinned on first sight, refused if its key changed."""
        bare, name = bare_jid(jid), node_name(node)
        if not self.is_friend(bare):
            self._drop("not_friend")
            return NodeState.REFUSED
        verdict = self.pins.check(bare, name, fingerprint, node_id)
        n = self.nodes.get((bare, name))
        if verdict is Verdict.CHANGED:
            self._drop("key_changed")
            if n is not None and n.state is not NodeState.REFUSED:
                return NodeState.REFUSED  # the pinned node is here and trusted: a forgery changes nothing
            n = self.nodes[(bare, name)] = FriendNode(bare, name, node_id, fingerprint)
            n.state, n.reason = NodeState.REFUSED, "key changed: 'ipop-switch friends forget' to re-pin"
            return n.state
        if n is None or n.node_id != node_id:
            n = self.nodes[(bare, name)] = FriendNode(bare, name, node_id, fingerprint)
        if n.state is NodeState.REFUSED:
            n.state, n.reason = NodeState.PENDING, ""
        return n.state

    def node_gone(self, jid: str, node: str) -> None:
        self.nodes.pop((bare_jid(jid), node_name(node)), None)

    def link(self, jid: str, node: str, up: bool) -> None:
        n = self.nodes.get((bare_jid(jid), node_name(node)))
        if n is not None and n.state is not NodeState.REFUSED:
            n.state = NodeState.LINKED if up else NodeState.PENDING

    def forget(self, jid: str, node: str) -> bool:
        """The user accepts a node's new key: the pin and the node's state go; the next announce re-pins."""
        self.nodes.pop((bare_jid(jid), node_name(node)), None)
        return self.pins.forget(jid, node)

    def wanted(self) -> dict[str, FriendNode]:
        """node id -> friend node that should have a link now."""
        return {n.node_id: n for n in self.nodes.values()
                if n.state is not NodeState.REFUSED and self.is_friend(n.jid)}

    def by_node_id(self, node_id: str) -> FriendNode | None:
        for n in self.nodes.values():
            if n.node_id == node_id:
                return n
        return None
