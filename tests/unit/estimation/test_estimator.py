"""The pack estimator: start from OCV, temperatures per cell, rest, groups, NaN inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bms.config import ProtectionConfig
from bms.estimation import ecm
from bms.estimation.estimator import PackEstimator
from bms.protection.plausibility import estimator_conditions


def estimator(cell, n_cells=2, n_temp_sensors=1, rest_time_s=10.0, n_parallel=1):
    return PackEstimator(cell, n_cells, n_temp_sensors, 0.5, rest_time_s, n_parallel)


def test_unknown_until_a_valid_voltage_then_from_its_ocv(linear):
    est = estimator(linear)
    assert np.isnan(est.unknown().soc).all() and np.isnan(est.unknown().charge_limit_a).all()
    out = est.step(0.0, np.array([math.nan, 3.4 + 0.05]), np.array([25.0]), 0.1)
    assert math.isnan(out.soc[0]) and math.isnan(out.soc_std[0])
    assert np.isnan(out.charge_limit_a[0]).all() and np.isnan(out.innovation_v[0])
    assert out.soc[1] == pytest.approx(0.4, abs=1e-6)  # OCV 3.0 + soc + 0.002 * 25
    # Under load the R0 drop is taken off before the OCV is read: 2 A charge, R0 = 17.5 mOhm.
    est = estimator(linear)
    out = est.step(2.0, np.full(2, 3.45 + 2.0 * 0.0175), np.array([25.0]), 0.1)
    assert out.soc == pytest.approx([0.4, 0.4], abs=1e-6)


def test_each_cell_takes_its_sensor_and_a_dead_sensor_the_mean(linear):
    est = estimator(linear, n_cells=4, n_temp_sensors=2)
    est.step(0.0, np.full(4, 3.5), np.array([10.0, 30.0]), 0.1)
    assert est.temp_c.tolist() == [10.0, 10.0, 30.0, 30.0]
    est.step(0.0, np.full(4, 3.5), np.array([math.nan, 30.0]), 0.1)
    assert est.temp_c.tolist() == [30.0] * 4
    est.step(0.0, np.full(4, 3.5), np.array([math.nan, math.nan]), 0.1)
    assert est.temp_c.tolist() == [30.0] * 4  # nothing valid: hold


def test_tracks_a_cell_that_drifts_from_its_start(generic):
    """A 5 Ah cell starting at 0.8 but believed at 0.6: the voltage pulls the estimate over."""
    n = 1800
    current = np.where(np.arange(n) % 120 < 60, -10.0, 0.0)
    v, soc_true = ecm.simulate(generic.tables, 5.0, 0.8, current, np.full(n, 25.0), np.ones(n))
    est = estimator(generic, n_cells=1, rest_time_s=1800.0)
    est.set_soc(0.6, soc_std=0.2)
    errors = []
    for k in range(n):
        out = est.step(current[k], np.array([v[k]]), np.array([25.0]), 1.0)
        errors.append(out.soc[0] - soc_true[k])
    assert np.abs(errors[600:]).max() < 0.01
    assert out.soc_std[0] < 0.02


def test_rest_re_initialises_once_per_rest(linear):
    est = estimator(linear, n_cells=1, rest_time_s=10.0)
    est.step(0.0, np.array([3.55]), np.array([25.0]), 0.1)
    est.x[0] = (0.2, 0.0, 0.0)  # far off, and certain of it
    est.p[0] = np.diag([1e-8, 1e-8, 1e-8])
    for _ in range(9):
        out = est.step(0.0, np.array([3.55]), np.array([25.0]), 1.0)
    assert out.soc[0] < 0.3
    out = est.step(0.0, np.array([3.55]), np.array([25.0]), 1.0)
    # back near the rested voltage's 0.5 (less what the filter still holds as polarisation)
    assert out.soc[0] == pytest.approx(0.5, abs=0.05)
    est.x[0] = (0.2, 0.0, 0.0)  # within the same rest it is not re-initialised again
    est.p[0] = np.diag([1e-8, 1e-8, 1e-8])
    assert est.step(0.0, np.array([3.55]), np.array([25.0]), 1.0).soc[0] < 0.3


def test_a_group_is_one_cell_carrying_its_share(linear):
    single, group = estimator(linear, n_cells=1), estimator(linear, n_cells=1, n_parallel=3)
    for est in (single, group):
        est.set_soc(0.5)
    for _ in range(100):
        a = single.step(-2.0, np.array([math.nan]), np.array([25.0]), 1.0)
        b = group.step(-6.0, np.array([math.nan]), np.array([25.0]), 1.0)
    assert b.soc == pytest.approx(a.soc) and a.soc[0] < 0.5
    assert b.discharge_limit_a == pytest.approx(3 * a.discharge_limit_a)


def test_a_bleeding_cell_loses_the_charge_its_resistor_draws(linear):
    """The bleed flows inside the pack: the pack current (0 A here) does not show it, so the
    estimator takes it from ``bleed_current_a``, per series group shared by its cells."""
    for n_parallel in (1, 2):
        est = estimator(linear, n_cells=2, n_parallel=n_parallel)
        est.set_soc(0.5)
        bleed_a = np.array([0.0, 0.1])
        for _ in range(360):  # 1 h, voltages unknown: the prediction alone
            out = est.step(0.0, np.full(2, math.nan), np.array([25.0]), 10.0, bleed_a)
        capacity_ah = linear.capacity_ah * n_parallel
        assert out.soc[0] == pytest.approx(0.5, abs=1e-9)
        assert out.soc[1] == pytest.approx(0.5 - 0.1 / capacity_ah, rel=1e-6)


def test_a_cell_far_from_its_model_is_flagged(linear):
    config = ProtectionConfig.model_construct(innovation_limit_sigma=6.0)
    est = estimator(linear, n_cells=2)
    est.step(0.0, np.array([3.45, 3.45]), np.array([25.0]), 0.1)
    out = est.step(0.0, np.array([3.45, 3.45]), np.array([25.0]), 0.1)
    assert estimator_conditions(out, config) == {
        "cell_model_mismatch": False,
        "temperature_outside_model": False,
    }
    out = est.step(0.0, np.array([3.45, 3.95]), np.array([25.0]), 0.1)
    assert estimator_conditions(out, config) == {
        "cell_model_mismatch": True,
        "temperature_outside_model": False,
    }
    out = est.step(0.0, np.array([3.45, math.nan]), np.array([25.0]), 0.1)
    assert estimator_conditions(out, config) == {
        "cell_model_mismatch": None,
        "temperature_outside_model": False,
    }


def test_a_fast_loop_spreads_the_state_of_power_over_cycles(linear):
    """40 cells at 10 ms: 4 cells a step, so each is refreshed every 100 ms; a (re)start
    refreshes them all at once."""
    est = PackEstimator(linear, 40, 1, 0.5, 1800.0, period_s=0.01)
    assert est.power_cells_per_step == 4
    first = est.step(0.0, np.full(40, 3.45), np.array([25.0]), 0.01)
    assert not np.isnan(first.discharge_limit_a).any()
    for _ in range(3):
        est.step(-10.0, np.full(40, 3.3), np.array([25.0]), 0.01)
    out = est.step(-10.0, np.full(40, 3.3), np.array([25.0]), 0.01)
    moved = np.any(out.discharge_limit_a != first.discharge_limit_a, axis=1)
    assert moved.sum() == 16  # four steps after the start, four cells each
    for _ in range(6):
        out = est.step(-10.0, np.full(40, 3.3), np.array([25.0]), 0.01)
    assert np.all(np.any(out.discharge_limit_a != first.discharge_limit_a, axis=1))


def test_state_of_power_keeps_to_the_window_it_is_given(generic):
    """The loop passes the limit set's operating limits (3.0-4.15 V for NMC): a load that
    follows the published limit must stay inside them, not merely inside 2.5-4.2 V."""
    wide = PackEstimator(generic, 1, 1, 0.5, 1800.0)
    narrow = PackEstimator(generic, 1, 1, 0.5, 1800.0, voltage_window_v=(3.0, 4.15))
    for est in (wide, narrow):
        est.set_soc(0.2)
    w = wide.step(0.0, np.array([math.nan]), np.array([0.0]), 0.0)
    n = narrow.step(0.0, np.array([math.nan]), np.array([0.0]), 0.0)
    assert np.all(n.discharge_limit_a < 0.8 * w.discharge_limit_a)
    d = 1  # 10 s
    v, _ = ecm.simulate(
        generic.tables, 5.0, 0.2, np.full(1001, -n.discharge_limit_a[0, d]),
        np.zeros(1001), np.full(1001, 0.01),
    )  # fmt: skip
    assert v.min() == pytest.approx(3.0, abs=3e-3)
    # Outside the cell's own limits the window is narrowed to them.
    assert (
        PackEstimator(generic, 1, 1, 0.5, 1.0, voltage_window_v=(2.0, 5.0)).power_voltage_max_v
        == 4.2
    )


def test_cells_beyond_the_tables_temperatures_are_marked(linear):
    """The linear set covers 0-40 degC; 5 degC beyond is tolerated."""
    est = estimator(linear, n_cells=4, n_temp_sensors=4)
    out = est.step(0.0, np.full(4, 3.5), np.array([-4.9, -5.1, 45.0, 45.1]), 0.1)
    assert out.outside_model.tolist() == [False, True, False, True]
    assert not est.unknown().outside_model.any()
