"""State of power from a power test: pulses from rest at a ladder of currents, measured on a
known cell (the ECM itself), must give back that cell's own limits."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from bms.estimation import fitting
from bms.estimation.estimator import PackEstimator
from bms.estimation.fitting import (
    FitError,
    complete_power_level,
    fit_ocv,
    fit_power,
    power_grid,
)
from bms.estimation.power import PowerMap, power_limits
from bms.identify import TEST_COLUMNS, read_test
from bms.types import POWER_DURATIONS_S
from tests.unit.estimation.synthetic import ocv_test, power_test, profile, run

TRUTH = Path(__file__).parents[2] / "data" / "truth"
LEVELS = (0.9, 0.5, 0.1)
LADDER_A = tuple(round(1.6**k, 1) for k in range(10))
"""1 to 68.7 A, spaced as the generator's power test (about 1.6x apart)."""


@pytest.fixture(scope="module")
def ocv_fit(generic):
    return fit_ocv(ocv_test(generic))


@pytest.fixture(scope="module")
def measured(generic, ocv_fit):
    data = power_test(generic, 25.0, LEVELS, LADDER_A, rest_s=7200.0)
    return fit_power(data, ocv_fit, POWER_DURATIONS_S)


def limits(cell, state, power_map=None, cap_a=1000.0):
    """(charge, discharge) limits (A) of one cell at 25 degC for POWER_DURATIONS_S."""
    x = np.asarray([state], float)
    out = np.empty((2, 1, len(POWER_DURATIONS_S)))
    power_limits(
        tuple(cell.tables),
        tuple(power_map if power_map is not None else cell.power_map),
        np.array([cell.capacity_ah]),
        x,
        np.array([25.0]),
        cell.voltage_min_v,
        cell.voltage_max_v,
        cap_a,
        np.array(POWER_DURATIONS_S),
        0,
        1,
        out[0],
        out[1],
    )
    return out[0, 0], out[1, 0]


def as_map(fits) -> PowerMap:
    return PowerMap(*power_grid(fits))


def test_pulses_from_rest_are_measured_at_each_duration(generic, measured):
    """The overpotential of a small pulse from rest is the ECM's step response at its level:
    R0 + R1 (1 - e^(-t/tau1)) + R2 (1 - e^(-t/tau2)), times the current."""
    assert measured.soc == pytest.approx(sorted(LEVELS), abs=0.005)
    assert list(measured.currents_a) == list(LADDER_A)
    assert measured.temp_c == 25.0
    for lv, soc in enumerate(measured.soc):
        z = generic.impedance_at(soc, 25.0)
        for d, t in enumerate(POWER_DURATIONS_S):
            ohm = (
                z["r0_ohm"]
                + z["r1_ohm"] * -math.expm1(-t / (z["r1_ohm"] * z["c1_f"]))
                + z["r2_ohm"] * -math.expm1(-t / (z["r2_ohm"] * z["c2_f"]))
            )
            for direction in (0, 1):
                assert measured.overpotential_v[lv, direction, 0, d] == pytest.approx(
                    ohm * LADDER_A[0], rel=0.03
                )


def test_a_pulse_cut_short_by_the_limit_is_recorded_with_how_long_it_lasted(measured):
    """At SOC 0.5 the cell's own 10 s and 30 s charge limits are 19.6 and 16.2 A: a 16.8 A
    charge pulse passes 4.2 V between 10 and 30 s, so it is measured at 2 and 10 s only."""
    lv = int(np.argmin(np.abs(measured.soc - 0.5)))
    k = LADDER_A.index(16.8)
    assert 10.0 < measured.lasted_s[lv, 1, k] < 30.0
    assert not np.isnan(measured.measured_v[lv, 1, k, :2]).any()
    assert np.isnan(measured.measured_v[lv, 1, k, 2])
    assert measured.lasted_s[lv, 1, k - 1] >= 30.0


def test_limits_from_the_map_agree_with_the_cell_it_was_measured_on(generic, measured):
    """From rest at each level, the limits from the map are never above the ECM's own closed
    form (by more than its 1 % tolerance) and within 10 % below it, where they fall inside
    the ladder: the completion of pulses that met the limit errs to the safe side."""
    power_map = as_map([measured])
    compared = 0
    for soc in measured.soc:
        ecm_charge, ecm_discharge = limits(generic, [soc, 0.0, 0.0])
        map_charge, map_discharge = limits(generic, [soc, 0.0, 0.0], power_map)
        for ecm_a, map_a in zip(
            np.concatenate((ecm_charge, ecm_discharge)),
            np.concatenate((map_charge, map_discharge)),
            strict=True,
        ):
            if LADDER_A[0] < ecm_a < LADDER_A[-1]:
                assert 0.9 * ecm_a <= map_a <= 1.01 * ecm_a
                compared += 1
    assert compared >= 16


def test_a_pulse_no_current_held_leaves_a_limit_below_the_ladder(generic, ocv_fit):
    """At SOC 0.005 (80 mV above the cut-off) even 5 A of discharge is past the limit at
    its first sample: the map's limits there are below 5 A, and not above the cell's own."""
    fit = fit_power(
        power_test(generic, 25.0, (0.5, 0.005), (5.0, 20.0)), ocv_fit, POWER_DURATIONS_S
    )
    assert np.isnan(fit.measured_v[0, 0]).all() and np.all(fit.lasted_s[0, 0] == 0.0)
    power_map = as_map([fit])
    _, map_discharge = limits(generic, [fit.soc[0], 0.0, 0.0], power_map)
    _, ecm_discharge = limits(generic, [fit.soc[0], 0.0, 0.0])
    assert np.all(map_discharge < 5.0)
    assert np.all(map_discharge <= ecm_discharge * 1.001)


def test_present_polarisation_towards_the_limit_lowers_the_limit(generic, measured):
    power_map = as_map([measured])
    _, rested = limits(generic, [0.5, 0.0, 0.0], power_map)
    _, loaded = limits(generic, [0.5, -0.05, -0.02], power_map)
    _, relieved = limits(generic, [0.5, 0.05, 0.0], power_map)
    assert np.all(loaded < rested) and np.all(relieved > rested)


def test_the_limit_never_passes_the_cap(generic, measured):
    power_map = as_map([measured])
    charge, discharge = limits(generic, [0.5, 0.0, 0.0], power_map, cap_a=10.0)
    assert discharge[0] == 10.0 and np.all(charge <= 10.0) and np.all(discharge <= 10.0)


def test_tests_at_several_temperatures_make_one_map(generic, ocv_fit):
    fits = [
        fit_power(power_test(generic, t, (0.9, 0.5), (1.0, 5.0)), ocv_fit, POWER_DURATIONS_S)
        for t in (0.0, 25.0)
    ]
    _, temps, currents_a, table = power_grid(fits)
    assert list(temps) == [0.0, 25.0] and list(currents_a) == [1.0, 5.0]
    assert table.shape == (2, 2, 2, 2, len(POWER_DURATIONS_S))
    # the generic set's resistance is higher in the cold
    assert np.all(table[0] > table[1])
    with pytest.raises(FitError, match="same temperature"):
        power_grid([fits[1], fits[1]])


def test_a_power_test_without_pulses_from_rest_is_named(generic, ocv_fit):
    steps = [(600, 0.0)] + [(30, -5.0), (300, 0.0), (30, 5.0), (300, 0.0)] * 5
    data = run(generic, "short_rests", 1.0, *profile(steps, 1.0), 25.0)
    with pytest.raises(FitError, match="no pulse after a rest of at least 1200 s"):
        fit_power(data, ocv_fit, POWER_DURATIONS_S)


def test_a_power_test_at_one_level_is_named(generic, ocv_fit):
    data = power_test(generic, 25.0, (0.5,), LADDER_A)
    with pytest.raises(FitError, match=r"1 SOC level\(s\).*at least two of each"):
        fit_power(data, ocv_fit, POWER_DURATIONS_S)


def test_the_pack_estimator_takes_its_limits_from_the_map(generic, measured):
    """A set with a power map: the estimator's limits are the map's, capped at the largest
    current the test pulsed rather than at 20C."""
    cell = dataclasses.replace(generic, power_map=as_map([measured]))
    estimator = PackEstimator(cell, 1, 1, 0.0, math.inf)
    assert estimator.power_cap_a == LADDER_A[-1]
    estimator.set_soc(0.5)
    estimate = estimator.step(0.0, np.array([math.nan]), np.array([25.0]), 0.0)
    charge, discharge = limits(cell, [0.5, 0.0, 0.0], cap_a=LADDER_A[-1])
    assert np.allclose(estimate.charge_limit_a[0], charge)
    assert np.allclose(estimate.discharge_limit_a[0], discharge)
    assert not np.allclose(discharge, limits(generic, [0.5, 0.0, 0.0], cap_a=LADDER_A[-1])[1])


def test_a_pulse_that_met_the_limit_grows_as_the_held_one_did_at_its_pace():
    """10 A held 30 s (0.05, 0.1, 0.2, 0.3 V at 0, 2, 10, 30 s); 20 A met the limit (0.5 V)
    at 2 s. Twice the current runs through the same curve four times as fast, so from 2 to
    10 s it grows as the 10 A pulse did from 8 to 40 s: 0.175 V to 0.35 V (carried past 30 s
    at the slope of its last third), twice: 1.0 V at 10 s."""
    time_s = np.array([0.0, 2.0, 10.0, 30.0])
    out = complete_power_level(
        np.array([10.0, 20.0]),
        [(time_s, np.array([0.05, 0.1, 0.2, 0.3])), (np.array([0.0, 2.0]), np.array([0.2, 0.5]))],
        10.0,
        lambda amps, t: 0.5,  # no OCV move: the headroom itself
    )
    assert out == pytest.approx([0.2, 1.0])


def test_a_current_not_tried_between_two_that_ran_is_not_taken_as_refused():
    """1 A and 4 A held, 2 A not tried, 8 A not run above them (refused, past the limit at
    once): 2 A is interpolated between its neighbours; 8 A grows from the limit at t = 0 as
    4 A did from 0 to 40 s (0.04 V to 0.14 V), 3.5 times: 1.75 V."""
    held = (np.array([0.0, 10.0, 30.0]), np.array([0.01, 0.02, 0.03]))
    out = complete_power_level(
        np.array([1.0, 2.0, 4.0, 8.0]),
        [held, None, (held[0], 4 * held[1]), None],
        10.0,
        lambda amps, t: 0.5,
    )
    assert out == pytest.approx([0.02, 0.04, 0.08, 1.75])


def test_a_pulse_stopped_short_is_no_cut_off_and_what_is_above_it_was_not_tried():
    """10 A held 30 s as above; 20 A stopped after 2 s at 0.2 V, short of the limit (0.5 V);
    40 A never ran. 20 A grows from its own 0.2 V as 10 A did from 8 to 40 s, twice: 0.4 V,
    under the limit (it is not floored at the crossing, as a cut-off is). 40 A was not tried,
    not refused: carried on at the power from 10 to 20 A (1), 0.8 V."""
    time_s = np.array([0.0, 2.0, 10.0, 30.0])
    out = complete_power_level(
        np.array([10.0, 20.0, 40.0]),
        [
            (time_s, np.array([0.05, 0.1, 0.2, 0.3])),
            (np.array([0.0, 2.0]), np.array([0.1, 0.2])),
            None,
        ],
        10.0,
        lambda amps, t: 0.5,
        np.array([False, True, False]),
    )
    assert out == pytest.approx([0.2, 0.4, 0.8])


def test_the_times_to_the_limit_place_it_where_the_cell_depletes():
    """10 A held 10 s with 0.3 V; 20 A and 40 A met the limit (0.5 V) after 5 s and 1.25 s:
    the time falls as current squared (Sand), so the pulse that would last exactly 10 s is
    20 * sqrt(5 / 10) = 14.1 A, and the table puts the limit there, below where growing in
    proportion to current (0.6 V at 20 A) would."""
    held = (np.array([0.0, 2.0, 10.0, 30.0]), np.array([0.28, 0.29, 0.3, 0.31]))
    out = complete_power_level(
        np.array([10.0, 20.0, 40.0]),
        [
            held,
            (np.array([0.0, 5.0]), np.array([0.45, 0.5])),
            (np.array([0.0, 1.25]), np.array([0.48, 0.5])),
        ],
        10.0,
        lambda amps, t: 0.5,
    )
    power = math.log(out[1] / out[0]) / math.log(2.0)
    assert out[1] > 0.6
    assert 0.3 * (20.0 * math.sqrt(0.5) / 10.0) ** power == pytest.approx(0.5)


@pytest.mark.parametrize(
    "state", [[math.nan, 0.0, 0.0], [0.5, math.inf, 0.0], [0.5, 0.0, math.nan]]
)
def test_a_state_that_is_not_a_number_carries_no_current(generic, measured, state):
    """With the map or without, a cell whose state is not finite gets 0 both ways (a search
    over NaN gaps would otherwise climb to the cap)."""
    for power_map in (None, as_map([measured])):
        charge, discharge = limits(generic, state, power_map)
        assert np.all(charge == 0.0) and np.all(discharge == 0.0)


def test_power_tests_over_different_soc_ranges_are_refused(generic, ocv_fit):
    """A test that stops short of the others' levels would be held at its own edge beyond
    them (optimistic towards empty): refused, saying which."""
    wide = fit_power(
        power_test(generic, 25.0, (0.9, 0.5, 0.1), (1.0, 5.0)), ocv_fit, POWER_DURATIONS_S
    )
    short = fit_power(power_test(generic, 0.0, (0.9, 0.5), (1.0, 5.0)), ocv_fit, POWER_DURATIONS_S)
    with pytest.raises(FitError, match=r"power test at 0 degC covers SOC 0\.50\d-0\.90\d"):
        power_grid([wide, short])


def test_a_current_that_wanders_a_little_stays_one_rung(generic, ocv_fit):
    """A cycler's 1.5 A is 1.4949 A at one level and 1.5004 A at another: one rung of the
    ladder, not two."""
    data = power_test(generic, 25.0, (0.9, 0.5), (1.5, 5.0))
    wander = np.where(np.abs(data.current_a) == 1.5, data.current_a * 0.99660, data.current_a)
    wander[: wander.size // 2] = np.where(
        np.abs(data.current_a[: wander.size // 2]) == 1.5,
        data.current_a[: wander.size // 2] * 1.00027,
        wander[: wander.size // 2],
    )
    fit = fit_power(dataclasses.replace(data, current_a=wander), ocv_fit, POWER_DURATIONS_S)
    assert list(fit.currents_a) == [1.5, 5.0]


def _stopped_after(data, current_a: float, level: int, after_s: float):
    """``data`` with the pulse of ``current_a`` at the ``level``-th SOC level (0 first) cut
    to zero current ``after_s`` into it (a cycler's stop, far from the voltage limit), and
    the charge put back after it (1 A the other way) cut to match."""

    def runs_of(amps):
        at = np.flatnonzero(data.current_a == amps)
        return np.split(at, np.flatnonzero(np.diff(at) > 1) + 1)

    def cut(run, after_s):
        current[run[data.time_s[run] >= data.time_s[run[0]] + after_s]] = 0.0

    current = data.current_a.copy()
    pulse = [r for r in runs_of(current_a) if data.time_s[r[-1]] - data.time_s[r[0]] < 60.0]
    cut(pulse[level], after_s)
    put_back = next(r for r in runs_of(-np.sign(current_a)) if r[0] > pulse[level][-1])
    cut(put_back, abs(current_a) * after_s)
    return dataclasses.replace(data, current_a=current)


@pytest.mark.parametrize("direction", [0, 1], ids=["discharge", "charge"])
@pytest.mark.parametrize("amps", [2.0, 5.0], ids=["middle rung", "top rung"])
def test_a_pulse_stopped_away_from_the_limit_counts_only_as_far_as_it_ran(
    generic, ocv_fit, direction, amps
):
    """A pulse at SOC 0.5 stops after 8 s, its voltage far from the limit (a cycler's
    stop). Read as cut off by the limit, it would make the cell's overpotential there the
    whole headroom (3.3 V at 5 A: a limit near zero on no evidence). Its 2 s value is its
    own; beyond, the middle rung is filled between 1 and 5 A (for this linear cell, its own
    value), and the top rung grows from its last value as the 2 A pulse did: never below
    the truth, and within half of it. The level at 0.9, run first, is untouched."""
    ladder_a = (1.0, 2.0, 5.0)
    data = power_test(generic, 25.0, (0.9, 0.5), ladder_a)
    whole = fit_power(data, ocv_fit, POWER_DURATIONS_S)
    sign = 1.0 if direction else -1.0
    fit = fit_power(_stopped_after(data, sign * amps, 1, 8.0), ocv_fit, POWER_DURATIONS_S)
    lv, k = int(np.argmin(np.abs(fit.soc - 0.5))), ladder_a.index(amps)
    assert whole.stopped == ()
    assert [(d, a) for _, d, a, _ in fit.stopped] == [(direction, amps)]
    assert fit.stopped[0][0] == pytest.approx(0.5, abs=0.005)
    assert 7.0 <= fit.lasted_s[lv, direction, k] < 8.0 <= 30.0 <= whole.lasted_s[lv, direction, k]
    got, truth = fit.overpotential_v[lv, direction, k], whole.overpotential_v[lv, direction, k]
    assert got[0] == pytest.approx(truth[0], rel=1e-9)  # 2 s: measured
    if amps == 2.0:
        assert got == pytest.approx(truth, rel=0.02)
    else:
        assert np.all(got >= truth) and np.all(got <= 1.5 * truth)
    assert np.array_equal(fit.overpotential_v[1 - lv], whole.overpotential_v[1 - lv])


def test_a_last_sample_that_lags_the_cut_off_is_still_a_cut_off():
    """The PyBaMM power test with the last sample of every pulse that met its limit taken
    out, as a log slower than the cycler's cut-off would have it: at 1 s and 40-135 A the
    voltage moves 0.15-0.3 V a sample, so the last one left lies up to 0.38 V from the
    limit. Each is still read as cut off (none as stopped), and all 46 pulses count."""
    ocv = fit_ocv(read_test(TRUTH / "ocv_25C_5min.csv"))
    data = read_test(TRUTH / "power_25C_3levels.csv")
    edges = np.diff((np.abs(data.current_a) > 0.03).astype(int))
    starts, ends = np.flatnonzero(edges == 1) + 1, np.flatnonzero(edges == -1)
    last = [
        end
        for start, end in zip(starts, ends, strict=True)
        if data.time_s[end] - data.time_s[start] < 30.0
    ]
    keep = np.setdiff1d(np.arange(data.time_s.size), last)
    lagging = fitting.TestData(data.name, *(getattr(data, column)[keep] for column in TEST_COLUMNS))
    assert fit_power(data, ocv, POWER_DURATIONS_S).stopped == ()
    fit = fit_power(lagging, ocv, POWER_DURATIONS_S)
    assert len(last) >= 10 and fit.stopped == () and fit.pulses == 46
