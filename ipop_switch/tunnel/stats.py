"""The counters of one link, shared by its send and receive loops and its state machine."""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable


class Stats:
    """Counters a link reports to the agent."""

    __slots__ = ("tx_frames", "tx_bytes", "rx_frames", "rx_bytes", "drops", "last_rx", "last_tx",
                 "rtt_ms", "handshakes", "tx_packets", "rx_packets", "tx_super", "rx_coalesced", "tx_gso", "mode",
                 "last_data_tx", "tx_wait", "check_at", "check_within", "kick", "pings")

    def __init__(self) -> None:
        self.tx_frames = self.tx_bytes = self.rx_frames = self.rx_bytes = 0
        self.tx_packets = self.rx_packets = 0       # data packets on the wire (segments)
        self.tx_super = self.rx_coalesced = 0       # TSO frames read / GSO frames written
        self.tx_gso = 0                             # UDP GSO sends (direct or relayed paths)
        self.drops: Counter[str] = Counter()
        self.last_rx = 0.0          # monotonic time of the last authenticated packet
        self.last_tx = 0.0          # ... of the last packet we sent (data or control)
        # keepalives (timers.keepalive_due): the last data frame we sent, the first data frame
        # or ping sent since last_rx (waiting for an answer while > last_rx), and the link's
        # next look at them: a send that starts waiting calls kick() if that look is later
        # than check_within from now (an idle link's next look may be 15 s away)
        self.last_data_tx = 0.0
        self.tx_wait = 0.0
        self.check_at = 0.0
        self.check_within = 1.0
        self.kick: Callable[[float], None] | None = None
        self.pings = 0              # pings we sent (keepalives, probes, RTT)
        self.rtt_ms: float | None = None
        self.handshakes = 0
        self.mode = "per-packet"

    def data_sent(self, now: float) -> None:
        """The send loop sent data frames at ``now`` (once per TAP burst, not per frame)."""
        self.last_tx = self.last_data_tx = now
        if self.tx_wait <= self.last_rx:
            self.tx_wait = now
            if self.check_at > now + self.check_within and self.kick is not None:
                self.kick(now)

    def as_dict(self) -> dict:
        now = time.monotonic()
        return {
            "tx_frames": self.tx_frames, "tx_bytes": self.tx_bytes,
            "rx_frames": self.rx_frames, "rx_bytes": self.rx_bytes,
            "tx_packets": self.tx_packets, "rx_packets": self.rx_packets,
            "tx_super": self.tx_super, "rx_coalesced": self.rx_coalesced, "tx_gso": self.tx_gso,
            "datapath": self.mode,
            "drops": dict(self.drops),
            "since_last_rx": None if not self.last_rx else round(now - self.last_rx, 3),
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "handshakes": self.handshakes, "pings": self.pings,
        }
