"""ipop-switch itself as a benchmarked system (filled in as the overlay lands)."""

from __future__ import annotations

from .peers import System


def available() -> dict[str, type[System]]:
    """Systems of ours that can be benchmarked on this checkout."""
    return {}
