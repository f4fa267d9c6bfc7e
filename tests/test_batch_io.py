"""UDP GSO/GRO batching on loopback: what one system call sends arrives intact and in order."""

from __future__ import annotations

import os
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


@pytest.mark.skipif(not batch_io.gso_supported(), reason="kernel without UDP GSO/GRO")
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
