"""The rate keeper on an injected clock: measured dt, re-phasing, missed cycles, lag."""

from __future__ import annotations

import pytest

from bms.loop import RateKeeper


class FakeClock:
    """A monotonic clock that moves only when slept on or pushed by the test."""

    def __init__(self, start_s: float = 100.0):
        self.now_s = start_s
        self.sleeps: list[float] = []
        self.oversleep_s = 0.0  # a scheduler that wakes us late

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, duration_s: float) -> None:
        self.sleeps.append(duration_s)
        self.now_s += duration_s + self.oversleep_s


def keeper(clock: FakeClock, period_s: float = 0.1, lag_limit_s: float = 0.05) -> RateKeeper:
    return RateKeeper(period_s, lag_limit_s, clock=clock, sleep=clock.sleep)


def test_steady_cycles_wake_on_the_period_and_report_measured_dt():
    clock = FakeClock()
    rate = keeper(clock)
    first_s, first_dt = rate.wait()
    assert (first_s, first_dt) == (100.0, 0.0)
    for n in range(1, 6):
        clock.now_s += 0.03  # the cycle's work
        now_s, dt_s = rate.wait()
        assert now_s == pytest.approx(100.0 + 0.1 * n)
        assert dt_s == pytest.approx(0.1)
    assert clock.sleeps == pytest.approx([0.07] * 5)
    assert rate.missed_cycles == 0 and not rate.lagging


def test_late_wake_up_passes_the_measured_dt_and_keeps_the_phase():
    clock = FakeClock()
    rate = keeper(clock)
    rate.wait()
    clock.now_s += 0.14  # overran by 0.04 s: less than a period, so no cycle is lost
    now_s, dt_s = rate.wait()
    assert dt_s == pytest.approx(0.14)
    assert rate.missed_cycles == 0
    now_s, dt_s = rate.wait()  # the next deadline is still on the original grid
    assert now_s == pytest.approx(100.2)
    assert dt_s == pytest.approx(0.06)


def test_overrun_re_phases_instead_of_bursting_and_counts_missed_cycles():
    clock = FakeClock()
    rate = keeper(clock)
    rate.wait()
    clock.now_s += 0.35  # a stall of 3.5 periods
    now_s, dt_s = rate.wait()
    assert dt_s == pytest.approx(0.35)
    assert rate.missed_cycles == 2  # deadlines at 100.2 and 100.3 were never run
    sleeps_before = len(clock.sleeps)
    now2_s, dt2_s = rate.wait()
    # No burst: the next cycle comes a full period after the late one.
    assert len(clock.sleeps) == sleeps_before + 1
    assert now2_s == pytest.approx(now_s + 0.1)
    assert dt2_s == pytest.approx(0.1)


def test_sustained_lateness_sets_lagging_and_recovery_clears_it():
    clock = FakeClock()
    rate = keeper(clock, period_s=0.1, lag_limit_s=0.02)
    rate.wait()
    clock.oversleep_s = 0.04  # every wake-up 40 ms late, never a whole period
    for _ in range(30):
        rate.wait()
    assert rate.lagging
    assert rate.missed_cycles == 0
    clock.oversleep_s = 0.0
    for _ in range(60):
        rate.wait()
    assert not rate.lagging


def test_one_late_cycle_does_not_set_lagging():
    clock = FakeClock()
    rate = keeper(clock, period_s=0.1, lag_limit_s=0.02)
    rate.wait()
    clock.now_s += 0.18
    rate.wait()
    assert not rate.lagging
