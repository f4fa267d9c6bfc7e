"""Shared fixtures: every lab or namespace set a test makes is removed afterwards,
even when the test fails; names are unique per test run so runs never collide."""

from __future__ import annotations

import itertools
import os
import signal
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# no per-example deadline: on 2 cores, beside lab daemons, a slow example is load, not a bug
# (a hang still ends at pytest-timeout); tests set their own example counts on top of this
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")

from ipop_switch.lab import Lab, LabSpec, destroy_lab, orphaned_labs

HELPERS = Path(__file__).parent / "helpers"
_counter = itertools.count(1)


def unique_name(prefix: str = "t") -> str:
    """A lab name unique to this test run (<= 10 chars, [a-z0-9])."""
    return f"{prefix}{os.getpid() % 100000}{next(_counter)}"[:10]


@pytest.fixture(scope="session", autouse=True)
def _need_root():
    if os.geteuid() != 0:
        pytest.exit("the test suite needs root (network namespaces, OVS, TAP): run ./bootstrap.sh test as root", 2)
    # what a killed earlier run left: its daemons died with it, its namespaces did not
    for name in orphaned_labs():
        destroy_lab(name)


def _sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


# a run stopped with SIGTERM (a CI timeout, kill) still tears its labs down: pytest runs
# fixture finalizers on KeyboardInterrupt, not on a bare SIGTERM
signal.signal(signal.SIGTERM, _sigterm)


@pytest.fixture
def lab_factory():
    """Build labs from a LabSpec (or flags); all are torn down at the end of the test."""
    made: list[Lab] = []

    def make(spec: LabSpec | None = None, **flags) -> Lab:
        if spec is None:
            spec = LabSpec.from_flags(name=unique_name(), **flags)
        lab = Lab(spec)
        made.append(lab)
        return lab.up()

    yield make
    for lab in made:
        lab.down()


@pytest.fixture
def scratch_lab_name():
    """A lab name whose namespaces (made with lab.Namespaces) are removed afterwards."""
    name = unique_name("n")
    yield name
    destroy_lab(name)


def helper(name: str) -> list[str]:
    """argv that runs tests/helpers/<name>.py with this interpreter."""
    return [sys.executable, str(HELPERS / f"{name}.py")]
