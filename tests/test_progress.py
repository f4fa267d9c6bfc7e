"""Progress on long steps: stage lines only on a terminal, nothing on a pipe or with JSON;
stages reported from deep code (Lab.up's steps) reach the command's status line; JSON
output stays parseable."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

from rich.console import Console

from ipop_switch.progress import Stages, json_console, live, spinner, stage


def _term() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=100), buf


def test_nothing_off_the_terminal():
    buf = io.StringIO()
    c = Console(file=buf, force_terminal=False)
    assert not live(c)
    with spinner(c, "building the lab ...") as update:
        stage("site 1/3")
        update("x")
    s = Stages(c, total=2)
    with s("one"):
        pass
    assert buf.getvalue() == ""
    stage("nobody listens")           # outside any spinner: a no-op


def test_stages_and_deep_stage_calls_on_a_terminal():
    c, buf = _term()
    s = Stages(c, total=3)
    with s("building the lab ..."):
        stage("site 2/3 easy (easy)")
        time.sleep(0.3)               # the status line refreshes (rich: ~12/s)
    with s("starting nodes ..."):
        time.sleep(0.2)
    out = buf.getvalue()
    assert "[1/3] building the lab ... site 2/3 easy (easy)" in out
    assert "[2/3] starting nodes ..." in out
    quiet = Console(file=io.StringIO(), force_terminal=True, quiet=True)
    assert not live(quiet)


def test_json_console_keeps_stdout_for_json():
    c, _ = _term()
    assert json_console(c, False) is c
    err = json_console(c, True)
    assert err.stderr and err is not c


def test_lab_down_json_is_parseable():
    r = subprocess.run([sys.executable, "-m", "ipop_switch.cli", "lab", "down", "--name", "nosuchlab1", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"nosuchlab1": {"namespaces": 0, "processes": 0}}
