"""Per-link timer settings (seconds). Defaults meet the design budgets: a dead path is
noticed within ``dead_after`` (< 5 s) and a new attempt starts within ``backoff_max``."""

from __future__ import annotations

import random
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Timers:
    keepalive: float = 1.0          # a ping (which is also the keepalive) each interval
    dead_after: float = 4.0         # no authenticated packet for this long: the path is dead
    rekey_after: float = 120.0      # the initiator starts a new handshake when the session is this old
    reject_after: float = 180.0     # a session older than this is never used (rekey must have happened)
    previous_keep: float = 15.0     # the replaced session still decrypts in-flight packets this long
    handshake_retry: float = 1.0    # a fresh initiation each interval until answered
    handshake_timeout: float = 5.0  # first handshake of an attempt
    gather_timeout: float = 8.0
    answer_timeout: float = 8.0     # controlling side waits this long for link_answer
    checks_timeout: float = 5.0     # ICE checks
    relay_delay: float = 1.0        # relay pairs are checked this much later than direct ones
    backoff_min: float = 0.5
    backoff_max: float = 2.0
    restart_every: float = 3.0      # controlled side re-asks for an offer this often while waiting
    upgrade_interval: float = 30.0  # a relayed link probes for a direct path this often (docs/tunnel.md §6)
    path_linger: float = 3.0        # an upgraded link still receives on the old relayed path this long
    addr_poll: float = 2.0          # local addresses are compared this often (ICE restart on change)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Timers":
        if not d:
            return cls()
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown timer(s) {sorted(bad)}; known: {sorted(known)}")
        for k, v in d.items():
            if not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"timer {k} must be a positive number, not {v!r}")
        return cls(**{k: float(v) for k, v in d.items()})


def jitter(x: float) -> float:
    """Spread retries so two sides (and many links) do not act in lockstep."""
    return x * (0.8 + 0.4 * random.random())
