"""Progress on long steps (lab up/down, the demo, bench): one transient status line on a
terminal, naming the stage and how far along it is ("[3/7] starting 4 nodes ...",
"site 2/5 easy"), and nothing at all when the output is not a terminal or is JSON.

Code deep below the CLI (``Lab.up``) reports with ``stage(text)``: a no-op unless a command
above is showing a ``spinner``, so tests and library callers see nothing. Base layer: rich
only, nothing of ours.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator

from rich.console import Console

_listener: ContextVar[Callable[[str], None] | None] = ContextVar("ipsw_progress", default=None)


def live(console: Console) -> bool:
    """Stage lines only on a terminal, and never on a quiet console (JSON on stdout)."""
    return console.is_terminal and not console.quiet


def stage(text: str) -> None:
    """Tell the spinner above (if any) what is happening now."""
    fn = _listener.get()
    if fn is not None:
        fn(text)


@contextlib.contextmanager
def spinner(console: Console, text: str) -> Iterator[Callable[[str], None]]:
    """A status line ``text`` (plus the latest ``stage``) while the block runs; yields the
    update function. Off the terminal: no output, and ``stage`` calls go nowhere."""
    if not live(console):
        token = _listener.set(None)
        try:
            yield lambda s: None
        finally:
            _listener.reset(token)
        return
    with console.status(text) as st:
        def update(s: str) -> None:
            st.update(f"{text} {s}")
        token = _listener.set(update)
        try:
            yield update
        finally:
            _listener.reset(token)


class Stages:
    """Numbered stages of one command: ``with stages("starting nodes ..."):`` shows
    "[n/total] starting nodes ..." on a terminal while the block runs."""

    def __init__(self, console: Console, total: int | None = None) -> None:
        self.console = console
        self.total = total
        self.n = 0

    @contextlib.contextmanager
    def __call__(self, text: str) -> Iterator[Callable[[str], None]]:
        self.n += 1
        count = f"[{self.n}/{self.total}] " if self.total else f"[{self.n}] "
        with spinner(self.console, f"{count}{text}") as update:
            yield update


def json_console(console: Console, json_to_stdout: bool) -> Console:
    """The console a command prints its human output on: stderr when its JSON goes to stdout,
    so ``--json -`` output stays parseable (and no stage line is drawn into it)."""
    if not json_to_stdout:
        return console
    return Console(stderr=True, width=console.width if console.is_terminal else 140)
