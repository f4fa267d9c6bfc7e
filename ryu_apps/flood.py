"""Flooding plan: per-origin shortest-path trees over the overlay graph.

Pure code (no os-ken) so the property tests run the very functions the app uses.

Every node computes, from its view of the overlay graph, for each origin (root) R:
``dist`` (hops from R to this node), ``parent`` (the neighbour R's frames must
arrive from) and ``children`` (the neighbours this node forwards R's frames to).
The tree is the BFS tree of R with a deterministic tie-break: the parent of X is
the neighbour w of X with the smallest (dist(R, w), w). Since every node applies
the same rule to the same graph, a child's idea of its parent and the parent's
idea of its children agree, so each node gets each frame exactly once, on
N-1 links in all; the origin never hears its own frame back.

Safety when views differ (links coming and going): a flood frame carries
(root, depth). A node accepts it only from its parent for that root and only
with depth == its own dist to the root, and forwards it with depth + 1. Depth
grows by exactly one per hop whatever the views, and no node forwards beyond
the largest distance it knows, so a frame dies after at most N hops: no loops,
even while nodes disagree (they may then lose or duplicate a frame, briefly).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping

MAX_ROOTS = 4094  # a root index is a 12-bit VLAN id (1..4094)


@dataclass(frozen=True)
class RootPlan:
    """What one node does with frames from one root."""

    root: str
    index: int  # tag value for this root (1..4094)
    dist: int  # hops from root to this node (0 for the root itself)
    parent: str | None  # neighbour frames from root arrive from (None for the root)
    children: tuple[str, ...]  # neighbours to forward to


@dataclass
class FloodPlan:
    """One node's flooding decisions for every root reachable in its view."""

    me: str
    roots: dict[str, RootPlan] = field(default_factory=dict)
    index_of: dict[str, int] = field(default_factory=dict)
    _by_index: dict[int, RootPlan] = field(default_factory=dict, repr=False)

    def by_index(self, index: int) -> RootPlan | None:
        if len(self._by_index) != len(self.roots):
            self._by_index = {rp.index: rp for rp in self.roots.values()}
        return self._by_index.get(index)


def normalize(me: str, edges: Iterable[tuple[str, str]], nodes: Iterable[str] = ()) -> dict[str, set[str]]:
    """Undirected adjacency from an edge list (self-loops dropped)."""
    adj: dict[str, set[str]] = {me: set()}
    for n in nodes:
        adj.setdefault(n, set())
    for a, b in edges:
        if a == b:
            continue
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    return adj


def bfs(adj: Mapping[str, set[str]], src: str) -> dict[str, int]:
    dist = {src: 0}
    q = deque([src])
    while q:
        u = q.popleft()
        for v in adj.get(u, ()):
            if v not in dist:
                dist[v] = dist[u] + 1
                q.append(v)
    return dist


def tree_parent(adj: Mapping[str, set[str]], dist_from_root: Mapping[str, int], x: str) -> str | None:
    """The parent of x in the root's tree: neighbour with the smallest (dist, id)."""
    best: tuple[int, str] | None = None
    for w in adj.get(x, ()):
        d = dist_from_root.get(w)
        if d is None:
            continue
        if best is None or (d, w) < best:
            best = (d, w)
    if best is None or best[0] >= dist_from_root.get(x, 1 << 30):
        return None
    return best[1]


def compute_plan(me: str, adj: Mapping[str, set[str]]) -> FloodPlan:
    """Plan for node ``me`` given its view ``adj`` (must be symmetric).

    Only BFS from roots is needed; cost O(N * (N + E)). Fine for the overlay
    sizes one bridge serves (hundreds of nodes: tens of ms).
    """
    nodes = sorted(adj)
    if len(nodes) > MAX_ROOTS:
        raise ValueError(f"overlay view has {len(nodes)} nodes; at most {MAX_ROOTS} can be tagged")
    index_of = {n: i + 1 for i, n in enumerate(nodes)}
    plan = FloodPlan(me=me, index_of=index_of)
    my_nbrs = adj.get(me, set())
    for root in nodes:
        d = bfs(adj, root)
        if me not in d:
            continue  # unreachable in this view
        parent = tree_parent(adj, d, me) if root != me else None
        children = tuple(
            sorted(x for x in my_nbrs if x in d and d[x] == d[me] + 1 and tree_parent(adj, d, x) == me)
        )
        plan.roots[root] = RootPlan(root=root, index=index_of[root], dist=d[me], parent=parent, children=children)
    return plan


def forward(plan: FloodPlan, root_index: int, depth: int, from_node: str) -> tuple[bool, tuple[str, ...], int]:
    """Decision for a tagged frame (root_index, depth) arriving from neighbour ``from_node``.

    Returns (accept: deliver locally, neighbours to forward to, depth to send with).
    Mirrors the flows the app installs (tables 1 and 2).
    """
    rp = plan.by_index(root_index)
    if rp is None or rp.root == plan.me or rp.parent != from_node or depth != rp.dist:
        return False, (), 0
    return True, rp.children, depth + 1


def originate(plan: FloodPlan) -> tuple[tuple[str, ...], int, int]:
    """(neighbours, root index, depth) for a frame this node floods itself."""
    rp = plan.roots[plan.me]
    return rp.children, rp.index, 1
