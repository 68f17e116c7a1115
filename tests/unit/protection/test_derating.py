"""Derating: tapers between MOL and RSL, zero on missing inputs, ramp up, never above a limit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bms.config import load_limit_set
from bms.protection.derating import (
    CurrentLimiter,
    DeratingConfig,
    charge_factors,
    discharge_factors,
    taper_lower,
    taper_upper,
)
from tests.conftest import LIMITS as LIMIT_FILE
from tests.fakes import estimate_of

LIMITS = load_limit_set(LIMIT_FILE)
CONFIG = DeratingConfig()


def test_upper_taper_is_one_at_mol_zero_at_rsl_linear_between():
    grades = LIMITS.temp_high_discharge_c  # 55 / 60 / 65
    assert [taper_upper(t, grades) for t in (20.0, 55.0, 57.5, 60.0, 70.0)] == [
        1.0,
        1.0,
        0.5,
        0.0,
        0.0,
    ]
    assert taper_upper(math.nan, grades) == 0.0


def test_lower_taper_is_one_at_mol_zero_at_rsl_linear_between():
    grades = LIMITS.cell_voltage_low_v  # 3.0 / 2.8 / 2.5
    assert [taper_lower(v, grades) for v in (3.5, 3.0, 2.9, 2.8, 2.0)] == pytest.approx(
        [1.0, 1.0, 0.5, 0.0, 0.0]
    )
    assert taper_lower(math.nan, grades) == 0.0


def factors(v=3.7, t=25.0, soc=0.5):
    args = (np.full(4, v), np.full(2, t), np.full(4, soc), LIMITS, CONFIG)
    return charge_factors(*args), discharge_factors(*args)


def test_healthy_pack_is_not_derated():
    charge, discharge = factors()
    assert set(charge.values()) == {1.0} and set(discharge.values()) == {1.0}


def test_each_factor_derates_its_own_direction():
    charge, discharge = factors(v=4.175)  # between charge MOL 4.15 and RSL 4.20
    assert charge["cell_voltage"] == pytest.approx(0.5) and discharge["cell_voltage"] == 1.0
    charge, discharge = factors(t=47.5)  # between charge MOL 45 and RSL 50; discharge fine
    assert charge["temp_high"] == pytest.approx(0.5) and discharge["temp_high"] == 1.0
    charge, discharge = factors(t=7.5)  # cold: charging derates, discharging does not
    assert charge["temp_low"] == pytest.approx(0.5) and discharge["temp_low"] == 1.0
    charge, discharge = factors(soc=0.975)
    assert charge["soc"] == pytest.approx(0.5) and discharge["soc"] == 1.0
    charge, discharge = factors(soc=0.025)
    assert charge["soc"] == 1.0 and discharge["soc"] == pytest.approx(0.5)


def test_a_wide_spread_derates_both_directions_from_its_mol_to_its_rsl():
    """The spread rows' MOL derates: a weak or hot cell limits charge and discharge alike
    (temperature spread 5 / 8 degC, cell voltage spread 0.10 / 0.20 V in nmc.toml)."""

    def spread_factors_of(v: np.ndarray, t: np.ndarray) -> list[tuple[float, float]]:
        charge = charge_factors(v, t, np.full(v.size, 0.5), LIMITS, CONFIG)
        discharge = discharge_factors(v, t, np.full(v.size, 0.5), LIMITS, CONFIG)
        return [(charge[k], discharge[k]) for k in ("temp_spread", "cell_voltage_spread")]

    cells_v = np.array([3.70, 3.70, 3.70, 3.70])
    assert spread_factors_of(cells_v, np.array([25.0, 31.5])) == [(0.5, 0.5), (1.0, 1.0)]
    assert spread_factors_of(cells_v, np.array([25.0, 33.0])) == [(0.0, 0.0), (1.0, 1.0)]
    weak_cell_v = np.array([3.70, 3.70, 3.55, 3.70])  # 0.15 V below the others
    (temp, voltage) = spread_factors_of(weak_cell_v, np.array([25.0, 26.0]))
    assert temp == (1.0, 1.0) and voltage == pytest.approx((0.5, 0.5))
    (_, voltage) = spread_factors_of(np.array([3.7, math.nan]), np.array([25.0, 26.0]))
    assert voltage == (0.0, 0.0)  # a missing cell may be the far one


def test_limiter_is_zero_unless_allowed_and_ramps_up_but_falls_at_once():
    limiter = CurrentLimiter(LIMITS, CONFIG, n_parallel=2)
    v, t, soc = np.full(4, 3.7), np.full(2, 25.0), estimate_of(np.full(4, 0.5))
    assert limiter.update(v, t, soc, allowed=False, dt_s=0.1) == (0.0, 0.0)
    charge_a, discharge_a = limiter.update(v, t, soc, allowed=True, dt_s=0.1)
    assert (charge_a, discharge_a) == pytest.approx((1.0, 1.0))  # 10 A/s for 0.1 s
    for _ in range(100):
        charge_a, discharge_a = limiter.update(v, t, soc, allowed=True, dt_s=0.1)
    assert (charge_a, discharge_a) == pytest.approx((20.0, 40.0))  # MOL x 2 in parallel
    hot = np.full(2, 59.0)  # discharge temperature 80 % of the way to its RSL
    charge_a, discharge_a = limiter.update(v, hot, soc, allowed=True, dt_s=0.1)
    assert discharge_a == pytest.approx(40.0 * 0.2)
    assert charge_a == 0.0  # above the charge RSL of 50 degC
    assert limiter.update(v, t, soc, allowed=False, dt_s=0.1) == (0.0, 0.0)


def test_state_of_power_caps_the_limits_and_unknown_power_means_none():
    limiter = CurrentLimiter(LIMITS, CONFIG, n_parallel=2)
    v, t = np.full(4, 3.7), np.full(2, 25.0)
    weak = estimate_of(np.full(4, 0.5), limit_a=100.0)
    # One cell can carry 12 A for 10 s (the configured duration), another 3 A for 30 s.
    weak.charge_limit_a[1, 1] = 12.0
    weak.discharge_limit_a[2, 1] = 7.0
    weak.discharge_limit_a[3, 2] = 3.0
    for _ in range(100):
        charge_a, discharge_a = limiter.update(v, t, weak, allowed=True, dt_s=0.1)
    assert (charge_a, discharge_a) == pytest.approx((12.0, 7.0))
    weak.discharge_limit_a[0, 1] = math.nan  # a cell without an estimate
    assert limiter.update(v, t, weak, allowed=True, dt_s=0.1)[1] == 0.0


finite_or_nan = st.one_of(st.floats(-50.0, 150.0), st.just(math.nan))


@settings(max_examples=300, deadline=None)
@given(
    cell_voltage_v=st.lists(
        st.one_of(st.floats(0.0, 6.0), st.just(math.nan)), min_size=1, max_size=8
    ),
    cell_temp_c=st.lists(finite_or_nan, min_size=1, max_size=4),
    soc=st.lists(st.one_of(st.floats(0.0, 1.0), st.just(math.nan)), min_size=1, max_size=8),
    allowed=st.booleans(),
    steps=st.integers(1, 30),
    n_parallel=st.integers(1, 4),
    power_a=st.one_of(st.floats(0.0, 200.0), st.just(math.nan)),
)
def test_published_limits_never_exceed_any_individual_limit(
    cell_voltage_v, cell_temp_c, soc, allowed, steps, n_parallel, power_a
):
    v, t, s = np.array(cell_voltage_v), np.array(cell_temp_c), np.array(soc)
    limiter = CurrentLimiter(LIMITS, CONFIG, n_parallel)
    for _ in range(steps):
        charge_a, discharge_a = limiter.update(
            v, t, estimate_of(s, limit_a=power_a), allowed, dt_s=0.5
        )
    if math.isnan(power_a):
        assert charge_a == 0.0 and discharge_a == 0.0
    else:
        assert charge_a <= power_a and discharge_a <= power_a
    charge, discharge = (
        charge_factors(v, t, s, LIMITS, CONFIG),
        discharge_factors(v, t, s, LIMITS, CONFIG),
    )
    assert 0.0 <= charge_a <= LIMITS.charge_current_a.mol * n_parallel
    assert 0.0 <= discharge_a <= LIMITS.discharge_current_a.mol * n_parallel
    for factor in charge.values():
        assert charge_a <= factor * LIMITS.charge_current_a.mol * n_parallel + 1e-9
    for factor in discharge.values():
        assert discharge_a <= factor * LIMITS.discharge_current_a.mol * n_parallel + 1e-9
    if not allowed or np.isnan(v).any() or np.isnan(t).any():
        assert charge_a == 0.0 and discharge_a == 0.0
