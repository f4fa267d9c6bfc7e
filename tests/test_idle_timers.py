"""Idle costs nothing (issue 16, item 1): the process-wide timer wheel, and the keepalive
decision (timers.keepalive_due) as a pure function and simulated over a link's life."""

from __future__ import annotations

import asyncio
import heapq
import time

import pytest
from hypothesis import given, settings, strategies as st

from ipop_switch.tunnel.timers import DEAD, NONE, PING, Timers, keepalive_due
from ipop_switch.tunnel.wheel import Wheel, wheel

T = Timers()


# -- the wheel ---------------------------------------------------------------------------
def run(coro, timeout: float = 10.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _until(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def test_wheel_fires_in_order_never_early_within_its_resolution():
    async def main():
        w = Wheel(0.05)
        fired: list[tuple[str, float, float]] = []
        now = time.monotonic()
        for name, d in (("c", 0.30), ("a", 0.07), ("b", 0.16)):
            when = now + d
            w.call_at(when, lambda n=name, t=when: fired.append((n, t, time.monotonic())))
        await _until(lambda: len(fired) == 3, 3)
        assert [f[0] for f in fired] == ["a", "b", "c"]
        for _, when, at in fired:
            assert at >= when - 0.002, (when, at)          # the loop's timers have ~1 ms grain
            assert at - when < 0.05 + 0.05, (when, at)     # resolution + scheduling slack
    run(main())


def test_wheel_many_deadlines_in_one_slot_wake_once():
    async def main():
        w = Wheel(0.1)
        n = []
        at = time.monotonic() + 0.15
        for i in range(32):
            w.call_at(at + i * 0.001, lambda: n.append(1))
        await _until(lambda: len(n) == 32, 3)
        await asyncio.sleep(0.2)
        assert w.wakeups <= 2, w.wakeups               # one slot (two if it straddles a boundary)
        assert len(w) == 0
    run(main())


def test_wheel_cancel_takes_the_timer_off_without_waking():
    async def main():
        w = Wheel(0.05)
        hit = []
        t1 = w.call_later(0.1, lambda: hit.append("cancelled"))
        t2 = w.call_later(0.3, lambda: hit.append("kept"))
        t1.cancel()
        assert not t1.active and t2.active and len(w) == 1
        await _until(lambda: hit, 3)
        assert hit == ["kept"]
        assert w.wakeups == 1                           # nothing woke for the cancelled one
    run(main())


def test_wheel_rescheduling_from_a_callback_runs_next_time_and_errors_stay_local():
    async def main():
        w = Wheel(0.05)
        runs: list[float] = []
        errors: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))

        def again():
            runs.append(time.monotonic())
            if len(runs) < 3:
                w.call_at(time.monotonic(), again)      # "now" from inside a firing: the next slot

        def broken():
            raise RuntimeError("a link's bug")
        w.call_later(0.05, broken)
        w.call_later(0.05, again)
        await _until(lambda: len(runs) == 3, 3)
        assert len(errors) == 1 and isinstance(errors[0]["exception"], RuntimeError)
        assert runs[1] > runs[0] and runs[2] > runs[1]
    run(main())


def test_one_wheel_per_event_loop():
    async def main():
        return wheel(), wheel()
    a1, a2 = asyncio.run(main())
    b1, _ = asyncio.run(main())
    assert a1 is a2 and a1 is not b1


def test_wheel_32_idle_links_wake_a_few_times_a_second_at_most():
    """32 links, each re-arming itself every 0.5 s (a 15 s idle period, scaled down 30x): the
    wheel wakes at most once per 0.1 s slot, not once per link."""
    async def main():
        w = Wheel(0.1)
        count = [0]

        def link(i: int):
            def check():
                count[0] += 1
                w.call_later(0.5 * (0.85 + 0.15 * ((i * 7919) % 100) / 100), check)
            return check
        for i in range(32):
            w.call_later(0.01 * i, link(i))
        await asyncio.sleep(2.0)
        return count[0], w.wakeups
    checks, wakeups = run(main())
    assert checks >= 32 * 3
    assert wakeups <= 2.0 / 0.1 + 2, (checks, wakeups)   # <= one per slot
    assert wakeups < checks / 3, (checks, wakeups)


# -- the keepalive decision ------------------------------------------------------------------
def due(now, *, last_rx, last_tx, last_data_tx=0.0, tx_wait=0.0, last_ping=0.0, t=T):
    return keepalive_due(now, last_rx=last_rx, last_tx=last_tx, last_data_tx=last_data_tx,
                         tx_wait=tx_wait, last_ping=last_ping, t=t, idle_every=t.idle_keepalive)


def test_traffic_both_ways_needs_no_ping():
    # data sent at 99.9, answered at 99.95; last ping 2 s ago (within ping_in_use)
    d = due(100.0, last_rx=99.95, last_tx=99.9, last_data_tx=99.9, tx_wait=99.9, last_ping=98.0)
    assert d.action == NONE
    assert d.at == pytest.approx(98.0 + T.ping_in_use)        # the next RTT ping, no sooner


def test_sent_and_unanswered_pings_each_keepalive_then_dead():
    kw = dict(last_rx=100.0, last_tx=100.2, last_data_tx=100.2, tx_wait=100.1)
    assert due(100.5, **kw).action == NONE
    assert due(100.5, **kw).at == pytest.approx(100.1 + T.keepalive)
    d = due(101.1, **kw)
    assert d.action == PING and d.at == pytest.approx(101.1 + T.keepalive)
    assert due(102.2, **kw, last_ping=101.1).action == PING
    d = due(100.1 + T.dead_after, **kw, last_ping=103.1)
    assert d.action == DEAD and "sent" in d.why


def test_idle_link_pings_only_for_the_nat_and_waits_for_its_pong():
    kw = dict(last_rx=100.0, last_tx=100.0, last_data_tx=10.0, tx_wait=10.0, last_ping=10.0)
    d = due(101.0, **kw)
    assert d.action == NONE and d.at == pytest.approx(100.0 + T.idle_keepalive)
    d = due(100.0 + T.idle_keepalive, **kw)
    assert d.action == PING                                    # NAT refresh ...
    assert d.at == pytest.approx(100.0 + T.idle_keepalive + T.keepalive)   # ... whose pong is awaited


def test_our_pongs_and_keepalives_do_not_wait_for_answers():
    # we answered the peer's ping at 114 (last_tx), nothing since; tx_wait is old: not waiting
    d = due(116.0, last_rx=114.0, last_tx=114.0, last_data_tx=10.0, tx_wait=10.0, last_ping=101.0)
    assert d.action == NONE and d.at == pytest.approx(114.0 + T.idle_keepalive)


def test_total_silence_is_dead_even_without_sending():
    d = due(100.0 + T.silence_limit, last_rx=100.0, last_tx=100.0 + T.silence_limit - 1)
    assert d.action == DEAD and "nothing authenticated" in d.why


def test_rtt_stays_fresh_while_in_use():
    d = due(100.0, last_rx=99.99, last_tx=99.99, last_data_tx=99.99, tx_wait=99.9, last_ping=100.0 - T.ping_in_use)
    assert d.action == PING


def test_next_look_is_always_in_the_future():
    for now in (0.0, 5.0, 100.0, 1e5):
        for kw in (dict(last_rx=0.0, last_tx=0.0), dict(last_rx=now, last_tx=now, last_data_tx=now, tx_wait=now)):
            d = due(now, **kw)
            assert d.action == DEAD or d.at > now


# -- a link's life, simulated ---------------------------------------------------------------
def simulate(sends: list[float], *, cut: float | None, rtt: float, answers_data: bool,
             end: float, t: Timers = T, idle_every: float | None = None) -> dict:
    """One side of a link driven as link.py drives it: checks at the due times, kicked when a
    send starts waiting; the peer answers pings (and data when ``answers_data``) after ``rtt``
    while the path is up (before ``cut``). Returns when it was declared dead and its pings."""
    idle_every = idle_every or t.idle_keepalive
    s = dict(last_rx=0.0, last_tx=0.0, last_data_tx=0.0, tx_wait=0.0, last_ping=0.0)
    ev: list[tuple[float, int, str]] = [(x, 1, "data") for x in sends]
    heapq.heapify(ev)
    check_at = 0.0
    heapq.heappush(ev, (check_at, 2, "check"))
    pings: list[float] = []
    up = (lambda x: cut is None or x < cut)
    while ev:
        now, _, kind = heapq.heappop(ev)
        if now > end:
            break
        if kind == "rx":
            s["last_rx"] = now
        elif kind == "data":
            s["last_tx"] = s["last_data_tx"] = now
            if s["tx_wait"] <= s["last_rx"]:
                s["tx_wait"] = now
                if check_at > now + t.keepalive:            # Stats.kick
                    check_at = now + t.keepalive
                    heapq.heappush(ev, (check_at, 2, "check"))
            if answers_data and up(now):
                heapq.heappush(ev, (now + rtt, 0, "rx"))
        elif kind == "check" and now == check_at:
            d = keepalive_due(now, t=t, idle_every=idle_every, **s)
            if d.action == DEAD:
                return {"dead": now, "pings": pings, "why": d.why}
            if d.action == PING:
                pings.append(now)
                s["last_ping"] = s["last_tx"] = now
                if s["tx_wait"] <= s["last_rx"]:
                    s["tx_wait"] = now
                if up(now):
                    heapq.heappush(ev, (now + rtt, 0, "rx"))
            assert d.at > now
            check_at = d.at
            heapq.heappush(ev, (check_at, 2, "check"))
    return {"dead": None, "pings": pings}


@settings(max_examples=150)
@given(cut=st.floats(5.0, 200.0), interval=st.floats(0.02, 0.9), rtt=st.floats(0.0005, 0.5),
       answers=st.booleans())
def test_a_link_in_use_is_dead_within_dead_after_of_the_cut(cut, interval, rtt, answers):
    """Data every ``interval`` (in use across the cut): dead within dead_after of the first
    send after the last answer (an answer in flight may land after the cut), never before."""
    end, start = cut + 10, max(0.0, cut - 10)           # in use from 10 s before the cut
    sends = [start + i * interval for i in range(int((end - start) / interval))]
    r = simulate(sends, cut=cut, rtt=rtt, answers_data=answers, end=end)
    assert r["dead"] is not None, r
    assert cut <= r["dead"] <= cut + rtt + interval + T.dead_after + 1e-9, (r["dead"], cut)


@settings(max_examples=100)
@given(cut=st.floats(1.0, 300.0), rtt=st.floats(0.0005, 0.5))
def test_an_idle_link_is_dead_within_an_idle_period_and_dead_after(cut, rtt):
    r = simulate([], cut=cut, rtt=rtt, answers_data=False, end=cut + 60)
    assert r["dead"] is not None and cut <= r["dead"] <= cut + T.idle_keepalive + T.dead_after + 1e-9, r


def test_an_idle_link_sends_a_ping_per_idle_period_only():
    r = simulate([], cut=None, rtt=0.02, answers_data=False, end=300.0)
    assert r["dead"] is None
    assert len(r["pings"]) <= 300.0 / T.idle_keepalive + 1, r["pings"]


def test_one_way_data_pings_once_per_keepalive_and_stays_up():
    sends = [i * 0.1 for i in range(1000)]                    # 100 s of one-way data (UDP)
    r = simulate(sends, cut=None, rtt=0.02, answers_data=False, end=100.0)
    assert r["dead"] is None
    assert 100 / (T.keepalive + 0.2) <= len(r["pings"]) <= 100 / T.keepalive + 2


def test_two_way_data_pings_only_for_the_rtt():
    sends = [i * 0.05 for i in range(2000)]                   # 100 s, every send answered
    r = simulate(sends, cut=None, rtt=0.01, answers_data=True, end=100.0)
    assert r["dead"] is None
    assert len(r["pings"]) <= 100 / T.ping_in_use + 2, len(r["pings"])
