"""Which links a node keeps, and how every node learns the overlay graph (issue 16).

Pure code (no asyncio, no I/O, nothing of agent/tunnel/bridge/signaling): the agent runs
it on its real members and links, ``ipop-switch sim`` on thousands of virtual nodes, and
the tests on both. ``docs/topology.md`` explains the policy and its figures.

- ``ring``: node ids as points on the 128-bit ring; successors, predecessors, distances.
- ``symphony``: long-link targets drawn from the harmonic distribution.
- ``ondemand``: traffic rate per peer over a sliding window.
- ``policy``: ``TopologyParams`` and ``TopologyPolicy``, the per-node decision.
- ``linkstate``: link-state advertisements and the database that merges them.
- ``sim``: the simulator (imports ryu_apps.flood for the real flood plan).
"""

from .linkstate import LSA, LinkStateDB, LsaOriginator
from .ondemand import OnDemand
from .policy import ROLES, Decision, TopologyParams, TopologyPolicy
from .ring import Ring

__all__ = ["LSA", "LinkStateDB", "LsaOriginator", "OnDemand", "ROLES", "Decision",
           "TopologyParams", "TopologyPolicy", "Ring"]
