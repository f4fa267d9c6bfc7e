"""Symphony long links: ring distances drawn from the harmonic distribution.

Symphony (Manku et al., 2003) draws a long link's distance, as a fraction x of the ring,
from p(x) = 1 / (x ln n) on [1/n, 1]: x = exp(ln n * (r - 1)) with r uniform in [0, 1).
Half of the draws land within n**-0.5 of the ring, a quarter within n**-0.75, ...: every
scale is equally likely, which is what makes greedy and shortest paths O(log n) long.
(Evio draws with log10 instead of ln and so almost never draws near links; this is the
real distribution.) The link goes to the member that succeeds the drawn point.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Iterable

from .ring import RING_SIZE, Ring, position


def harmonic_fraction(n: int, r: float) -> float:
    """The ring fraction for a uniform r in [0, 1) among n members: in [1/n, 1)."""
    if n < 2:
        return 1.0
    return math.exp(math.log(n) * (r - 1.0))


def draw_targets(me: str, ring: Ring, count: int, rng: random.Random,
                 exclude: Iterable[str] = (), max_draws: int | None = None,
                 acceptable: Callable[[str], bool] | None = None,
                 load: Callable[[str], int] | None = None) -> list[str]:
    """Up to ``count`` distinct long-link targets for ``me``.

    Skips me, ``exclude`` (successors, peers already linked, peers that refused us) and
    targets ``acceptable`` rejects; every skip is a fresh draw, at most ``max_draws`` in
    all (default 8 per target), so a crowded ring gives fewer targets, never a loop.

    With ``load`` (a member's known link count), the target is the less loaded of the
    point's successor and the next member ("two choices"): a member's share of draws
    grows with the gap before it on the ring, and this evens the long links per node out
    (fewer refusals at the degree cap) while moving the distance by one member at most.
    """
    n = len(ring)
    if count <= 0 or n < 2:
        return []
    skip = set(exclude)
    skip.add(me)
    me_pos = position(me)
    out: list[str] = []
    draws = max_draws if max_draws is not None else 8 * count
    for _ in range(draws):
        x = harmonic_fraction(n, rng.random())
        first = ring.successor_of_point(me_pos + int(x * RING_SIZE))
        candidates = [first]
        if load is not None:
            candidates += ring.successors(first, 1)
        ok = [t for t in candidates if t not in skip and (acceptable is None or acceptable(t))]
        if not ok:
            continue
        target = min(ok, key=load) if load is not None and len(ok) > 1 else ok[0]
        out.append(target)
        skip.add(target)
        if len(out) == count:
            break
    return out
