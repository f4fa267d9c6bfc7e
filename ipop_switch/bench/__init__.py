"""Benchmarks: ipop-switch side by side with the underlay and peer VPNs, in one lab run."""
