"""Bounded waits for the tests: poll a condition, read a line, with a deadline and a message
that says what did not happen (a fixed sleep is either too long or, on a busy machine, too short)."""

from __future__ import annotations

import select
import subprocess
import time
from typing import IO, Callable, TypeVar

T = TypeVar("T")


def wait_until(pred: Callable[[], T], timeout: float, what: str, *, interval: float = 0.05,
               retry_on: tuple[type[BaseException], ...] = ()) -> T:
    """Poll ``pred`` until it returns something truthy and return that; fail the test after
    ``timeout`` seconds. Exceptions in ``retry_on`` count as "not yet" (e.g. a socket not up)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            got = pred()
            if got:
                return got
        except retry_on as e:
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}"
                                 + (f" (last error: {last})" if last else ""))
        time.sleep(interval)


def readline_within(stream: IO, timeout: float, what: str) -> str:
    """One line from a child's pipe, or fail after ``timeout`` seconds (readline alone would
    wait until the global test timeout if the child hangs before writing)."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
    line = stream.readline()
    if isinstance(line, bytes):
        line = line.decode()
    return line


def listening(run: Callable[[list[str]], subprocess.CompletedProcess], proto: str, port: int) -> bool:
    """True if something listens on ``proto`` ("tcp"/"udp") ``port`` where ``run`` executes
    (e.g. ``lambda argv: lab.exec(host, argv)``): a server is ready before a client starts."""
    flag = "-ltnH" if proto == "tcp" else "-lunH"
    out = run(["ss", flag, f"sport = :{port}"]).stdout
    return bool(out.strip())


async def async_wait_until(pred: Callable[[], T], timeout: float, what: str, *, interval: float = 0.05) -> T:
    """``wait_until`` for a test running in an event loop (the loop keeps running meanwhile)."""
    import asyncio
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)
