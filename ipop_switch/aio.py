"""asyncio helpers every part uses (a base room: imports nothing of ours)."""

from __future__ import annotations

import asyncio


async def cancel_and_wait(*tasks: asyncio.Future | None) -> None:
    """Cancel ``tasks`` (None and finished ones skipped) and wait until each has ended, so a
    stop returns only once nothing of the part still runs; their exceptions are not ours to
    raise here (each task logs its own)."""
    live = [t for t in tasks if t is not None and not t.done()]
    for t in live:
        t.cancel()
    for t in live:
        try:
            await t
        except (asyncio.CancelledError, Exception):
            pass
