"""UDP GSO/GRO batching on loopback: what one system call sends arrives intact and in order."""

from __future__ import annotations

import os
import platform
import re
import socket
import time

import pytest
from hypothesis import given, settings, strategies as st

from ipop_switch.tunnel import batch_io


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=9000), min_size=1, max_size=200))
def test_gso_groups_respect_kernel_limits_and_keep_order(sizes):
    dgrams = [bytes([i % 256]) * s for i, s in enumerate(sizes)]
    out = []
    for group, size in batch_io.gso_groups(dgrams):
        assert 1 <= len(group) <= batch_io.GSO_MAX_SEGMENTS
        assert len(group) == 1 or sum(map(len, group)) <= batch_io.GSO_MAX_BYTES
        assert all(len(d) == size for d in group[:-1]) and len(group[-1]) <= size
        out += group
    assert out == dgrams


def _kernel() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    assert m, platform.release()
    return int(m[1]), int(m[2])


# Decided by the kernel's version, not by the code under test: UDP_SEGMENT is in Linux
# 4.18, UDP_GRO in 5.0.
needs_gro = pytest.mark.skipif(_kernel() < (5, 0), reason=f"Linux {platform.release()} < 5.0: no UDP GRO")


@needs_gro
def test_gso_is_reported_supported_on_this_kernel():
    assert batch_io.gso_supported()


@needs_gro
def test_gso_send_gro_receive_on_loopback():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        batch_io.tune_socket(rx, gro=True)
        batch_io.tune_socket(tx, gro=False)
        rx.setblocking(False)
        sent = [os.urandom(1400) for _ in range(40)] + [os.urandom(700)] + [os.urandom(1400) for _ in range(30)]
        calls = batch_io.send_batch(tx, sent, rx.getsockname())
        assert calls <= 3
        got: list[bytes] = []
        receives = 0
        deadline = time.monotonic() + 5
        while len(got) < len(sent) and time.monotonic() < deadline:
            r = batch_io.recv_batch(rx)
            if r is None:
                time.sleep(0.005)
                continue
            receives += 1
            got += r[0]
        assert got == sent
        assert receives < len(sent)  # GRO glued datagrams together
    finally:
        rx.close()
        tx.close()
