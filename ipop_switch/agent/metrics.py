"""Prometheus metrics from the same status snapshot ``ipop-switch status`` shows."""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry


class StatusCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable:
        st = self.snapshot()
        up = GaugeMetricFamily("ipsw_peer_up", "1 if the link to the peer carries traffic", labels=["overlay", "peer"])
        direct = GaugeMetricFamily("ipsw_peer_direct", "1 direct path, 0 relayed", labels=["overlay", "peer"])
        rtt = GaugeMetricFamily("ipsw_peer_rtt_seconds", "round-trip time through the link", labels=["overlay", "peer"])
        fr = CounterMetricFamily("ipsw_peer_frames", "frames through the link", labels=["overlay", "peer", "direction"])
        by = CounterMetricFamily("ipsw_peer_bytes", "bytes through the link", labels=["overlay", "peer", "direction"])
        drops = CounterMetricFamily("ipsw_peer_drops", "packets dropped by reason", labels=["overlay", "peer", "reason"])
        sig = CounterMetricFamily("ipsw_signaling_drops", "signaling messages dropped by reason", labels=["overlay", "reason"])
        peers = GaugeMetricFamily("ipsw_peers", "known peers of the overlay", labels=["overlay"])
        sw = CounterMetricFamily("ipsw_switch_events", "the switch app's counters (packet-ins, MACs refused over "
                                 "the caps, foreign datapaths refused, packet-ins OVS dropped, ...)",
                                 labels=["overlay", "event"])
        gfr = CounterMetricFamily("ipsw_guest_frames", "frames from (rx) and to (tx) a guest's port",
                                  labels=["overlay", "guest", "direction"])
        gby = CounterMetricFamily("ipsw_guest_bytes", "bytes from (rx) and to (tx) a guest's port",
                                  labels=["overlay", "guest", "direction"])
        gdr = CounterMetricFamily("ipsw_guest_drops", "frames of a guest dropped by reason (dhcp, ra, spoof, "
                                  "macs_refused)", labels=["overlay", "guest", "reason"])
        gmac = GaugeMetricFamily("ipsw_guest_macs", "stations learned behind a guest's port", labels=["overlay", "guest"])
        dq = CounterMetricFamily("ipsw_dns_queries", "DNS queries answered by kind (answers, nodata, nxdomain, "
                                 "refused, forwarded)", labels=["overlay", "kind"])
        dd = CounterMetricFamily("ipsw_dns_drops", "DNS datagrams dropped by reason (malformed, not_query, too_large, "
                                 "forward_busy, forward_failed)", labels=["overlay", "reason"])
        for ov in st.get("overlays", []):
            name = ov["name"]
            dns = ov.get("dns") or {}
            for kind in ("answers", "nodata", "nxdomain", "refused", "forwarded"):
                if kind in dns:
                    dq.add_metric([name, kind], dns[kind])
            for reason, n in (dns.get("drops") or {}).items():
                dd.add_metric([name, reason], n)
            for g in ov.get("guests", []):
                if g.get("error"):
                    continue
                lbl = [name, g["name"]]
                for d in ("rx", "tx"):
                    if g.get(f"{d}_frames") is not None:
                        gfr.add_metric(lbl + [d], g[f"{d}_frames"])
                        gby.add_metric(lbl + [d], g[f"{d}_bytes"])
                for reason, n in (g.get("drops") or {}).items():
                    gdr.add_metric(lbl + [reason], n)
                if g.get("macs") is not None:
                    gmac.add_metric(lbl, len(g["macs"]))
            peers.add_metric([name], len(ov.get("peers", [])))
            for reason, n in ov.get("signaling", {}).get("drops", {}).items():
                sig.add_metric([name, reason], n)
            for event, n in (ov.get("switch") or {}).items():
                if isinstance(n, (int, float)) and not isinstance(n, bool):
                    sw.add_metric([name, event], n)
            for p in ov.get("peers", []):
                lbl = [name, p["node_id"]]
                up.add_metric(lbl, 1 if p.get("state") == "up" else 0)
                direct.add_metric(lbl, 1 if p.get("path") == "direct" else 0)
                if p.get("rtt_ms") is not None:
                    rtt.add_metric(lbl, p["rtt_ms"] / 1000)
                for d in ("tx", "rx"):
                    fr.add_metric(lbl + [d], p.get(f"{d}_frames", 0))
                    by.add_metric(lbl + [d], p.get(f"{d}_bytes", 0))
                for reason, n in (p.get("drops") or {}).items():
                    drops.add_metric(lbl + [reason], n)
        yield from (peers, up, direct, rtt, fr, by, drops, sig, sw, gfr, gby, gdr, gmac, dq, dd)


def start_metrics(addr: str, snapshot: Callable[[], dict]):
    """Serve /metrics on host:port (a thread of prometheus_client); returns (server, thread)."""
    from prometheus_client import start_http_server

    host, _, port = addr.rpartition(":")
    reg = CollectorRegistry()
    reg.register(StatusCollector(snapshot))
    return start_http_server(int(port), addr=host or "127.0.0.1", registry=reg)
