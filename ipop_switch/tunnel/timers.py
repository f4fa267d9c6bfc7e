"""Per-link timer settings (seconds), and the keepalive decision they drive.

Defaults meet the design budgets: a dead path of a link in use is noticed within
``dead_after`` (< 5 s) and a new attempt starts within ``backoff_max``. An idle link costs
almost nothing (issue 16): WireGuard's model, docs/tunnel.md "Keepalives".
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import NamedTuple


@dataclass(frozen=True)
class Timers:
    keepalive: float = 1.0          # sent something and heard nothing back this long: a ping (then each interval)
    dead_after: float = 4.0         # sent something and nothing authenticated since, this long: the path is dead
    idle_keepalive: float = 15.0    # idle both ways: a ping this often (NAT mappings: UDP timeouts are >= 30 s)
    ping_in_use: float = 5.0        # while we send data: a ping at least this often (RTT in status)
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
    addr_poll: float = 2.0          # local addresses are compared this often (only without netlink)

    @property
    def silence_limit(self) -> float:
        """Nothing authenticated for this long is dead even with nothing sent: the peer's own
        idle pings (two of them) would have arrived."""
        return 2 * self.idle_keepalive + self.dead_after

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


NONE, PING, DEAD = "none", "ping", "dead"


class Due(NamedTuple):
    """What a link does now (``action``: NONE, PING or DEAD, with ``why``) and when it must
    look again (``at``, monotonic seconds)."""
    action: str
    at: float
    why: str = ""


def keepalive_due(now: float, *, last_rx: float, last_tx: float, last_data_tx: float, tx_wait: float,
                  last_ping: float, t: Timers, idle_every: float | None = None) -> Due:
    """The keepalive decision of an up link, a pure function of its clocks (monotonic s):

    - ``last_rx``: the last authenticated packet from the peer (data, ping, pong, keepalive);
    - ``last_tx``: the last packet we sent (data or control);
    - ``last_data_tx``: the last data frame we sent;
    - ``tx_wait``: the first data frame or ping we sent after ``last_rx`` (it waits for an
      answer when ``tx_wait > last_rx``; pongs and keepalives never wait);
    - ``last_ping``: our last ping.

    A link that carries traffic both ways sends no extra packet. One we sent on and heard
    nothing back from for ``keepalive`` gets a ping each ``keepalive`` (the pong is the
    answer), and is dead ``dead_after`` after that first unanswered send. A link idle both
    ways pings every ``idle_every`` (default ``idle_keepalive``; the NAT refresh, also a
    liveness check: its pong is awaited like any answer); silence past ``silence_limit`` is
    dead too. While we send data, a ping at least every ``ping_in_use`` keeps the RTT fresh.
    """
    idle_every = idle_every or t.idle_keepalive
    waiting = tx_wait > last_rx
    if waiting and now >= tx_wait + t.dead_after:
        return Due(DEAD, now, f"dead path: sent {now - tx_wait:.1f}s ago, nothing authenticated since")
    if now >= last_rx + t.silence_limit:
        return Due(DEAD, now, f"dead path: nothing authenticated for {now - last_rx:.1f}s")
    in_use = now < last_data_tx + t.ping_in_use
    action = NONE
    if now >= _ping_at(waiting, tx_wait, last_tx, last_ping, in_use, t, idle_every):
        action = PING
        last_ping = last_tx = now            # as the link will see it after sending the ping
        if not waiting:
            tx_wait, waiting = now, True
    at = _ping_at(waiting, tx_wait, last_tx, last_ping, in_use, t, idle_every)
    if waiting:
        at = min(at, tx_wait + t.dead_after)
    return Due(action, min(at, last_rx + t.silence_limit))


def _ping_at(waiting: bool, tx_wait: float, last_tx: float, last_ping: float, in_use: bool,
             t: Timers, idle_every: float) -> float:
    """When the next ping is due: each ``keepalive`` while waiting for an answer; else after
    ``idle_every`` without sending anything, or ``ping_in_use`` after the last ping while in use."""
    if waiting:
        return max(tx_wait, last_ping) + t.keepalive
    at = last_tx + idle_every
    return min(at, last_ping + t.ping_in_use) if in_use else at
