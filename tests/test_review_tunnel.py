"""Regression tests for the tunnel's findings of the security review (issue 18, "Review
findings" 2, 7, 9 and 10). Each failed on the code before its fix:

- 9: the C objects used uninitialised (or after a failed second ``__init__``) crashed the
  process (SIGFPE, SIGSEGV); now every method raises.
- 10: a forged packet in a burst was decrypted twice (in C, then again in Python).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
import textwrap

import pytest

from ipop_switch.tunnel import accel

from test_fastpath import _BYTES, receiver, wire_of

fp = accel.fastpath or importlib.import_module("ipop_switch.tunnel._fastpath")


# -- finding 9: C objects used uninitialised -----------------------------------------------
_PRELUDE = """
import importlib, os
fp = importlib.import_module("ipop_switch.tunnel._fastpath")
def raises(f, exc):
    try:
        f()
    except exc as e:
        print("raised", type(e).__name__)
        return
    print("returned")
# a layout seal_tcp takes (Ethernet, a 40-byte IP header, TCP at 54, payload at 74, 100-byte
# segments): segment 0 is 16 + 74 + 100 + 16 = 206 bytes
SEAL_ARGS = (bytes(200), 74, 54, 100, 0, 1, 0, bytes(8), bytes(8), bytearray(400))
"""

MISUSES = {
    "RxState.__new__ then update": "raises(lambda: fp.RxState.__new__(fp.RxState).update(5), RuntimeError)",
    "RxState.__new__ then check": "raises(lambda: fp.RxState.__new__(fp.RxState).check(5), RuntimeError)",
    "TxKey.__new__ then seal_tcp": (
        "raises(lambda: fp.TxKey.__new__(fp.TxKey).seal_tcp(*SEAL_ARGS), RuntimeError)"),
    "open_burst with an uninitialised RxState": (
        "raises(lambda: fp.FastRx().open_burst(fp.RxState.__new__(fp.RxState), b'abcd',"
        " b'\\xe3' * 64, 0, 64, []), RuntimeError)"),
    # a failed second __init__ keeps the working state it had
    "RxState failed second __init__": (
        "r = fp.RxState(os.urandom(32)); raises(lambda: r.__init__(b'short'), ValueError); "
        "print('update', r.update(7), r.update(7), r.highest)"),
    "TxKey failed second __init__": (
        "k = fp.TxKey(os.urandom(32)); raises(lambda: k.__init__(b'short'), ValueError); "
        "print('sealed', k.seal_tcp(*SEAL_ARGS))"),
}
EXPECTED = {
    "RxState.__new__ then update": "raised RuntimeError",
    "RxState.__new__ then check": "raised RuntimeError",
    "TxKey.__new__ then seal_tcp": "raised RuntimeError",
    "open_burst with an uninitialised RxState": "raised RuntimeError",
    "RxState failed second __init__": "raised ValueError\nupdate True False 7",
    "TxKey failed second __init__": "raised ValueError\nsealed 206",     # the key is still there
}


@pytest.mark.parametrize("name", sorted(MISUSES))
def test_c_objects_used_uninitialised_raise_instead_of_crashing(name):
    """Each misuse in its own interpreter, so a crash fails the test instead of pytest."""
    code = textwrap.dedent(_PRELUDE) + MISUSES[name] + "\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "IPSW_NO_ACCEL"})
    assert r.returncode == 0, f"{name}: exit {r.returncode} (a negative one is the signal) {r.stderr[-400:]}"
    assert r.stdout.strip() == EXPECTED[name], r.stdout


# -- finding 10: a forged packet costs one decryption -------------------------------------
class CountingAEAD:
    """The session's Python receive AEAD, counting the decryptions asked of it."""

    def __init__(self, aead) -> None:
        self.aead = aead
        self.calls = 0

    def decrypt(self, nonce, data, aad):
        self.calls += 1
        return self.aead.decrypt(nonce, data, aad)


@pytest.mark.parametrize("forged", [0, 4, 9])
def test_a_forged_segment_in_a_burst_is_decrypted_once_and_counted(forged):
    """A GRO burst of 10 TCP segments with one forged tag: the C loop decrypts it once,
    counts it (``auth``) and goes on; the Python path never sees it; the 9 genuine
    segments are delivered."""
    keys = (os.urandom(32), os.urandom(32))
    wire = wire_of(keys, [(0, _BYTES[:10 * 1000], "A", 1000)])
    assert len(wire) == 10 and len({len(d) for d in wire}) == 1
    bad = bytearray(wire[forged])
    bad[-1] ^= 1
    wire[forged] = bytes(bad)

    async def go():
        dp, tap = receiver(keys, True)
        try:
            s = dp.table.by_index[22]
            py = s.recv_aead = CountingAEAD(s.recv_aead)
            dp.receive(b"".join(wire), len(wire[0]), ("198.18.0.9", 1), None, None)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            frames = tap.frames()
            return py.calls, dict(dp.stats.drops), dp.stats.rx_packets, frames
        finally:
            tap.close()

    calls, drops, rx_packets, frames = asyncio.run(go())
    assert calls == 0, "the forged packet was decrypted again in Python"
    assert drops == {"auth": 1}
    assert rx_packets == 9
    assert sum(len(f) - 54 for _, f in frames) == 9 * 1000     # Ethernet + IPv4 + TCP: 54 bytes each
