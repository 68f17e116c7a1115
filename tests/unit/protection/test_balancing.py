"""Passive balancing decisions: charge to remove, hysteresis, duty, when it may run."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from bms.protection.balancing import (
    Balancer,
    BalancingConfig,
    bleed_current_a,
    charge_to_remove_ah,
)

CONFIG = BalancingConfig(max_duty=1.0)  # duty tested on its own
V = np.full(4, 3.9)
SURE = 0.01  # an SOC sigma the balancer trusts
T = np.full(2, 25.0)


def test_charge_to_remove_equalises_at_the_target():
    soc = np.array([0.80, 0.82, 0.79, 0.80])
    assert charge_to_remove_ah(soc, 5.0, "top") == pytest.approx([0.05, 0.15, 0.0, 0.05])
    assert charge_to_remove_ah(soc, 5.0, "bottom") == pytest.approx([0.05, 0.15, 0.0, 0.05])
    capacity_ah = np.array([5.0, 5.0, 4.0, 5.0])  # a weaker cell: the targets now differ
    top = charge_to_remove_ah(soc, capacity_ah, "top")
    bottom = charge_to_remove_ah(soc, capacity_ah, "bottom")
    assert top[2] == pytest.approx(0.16) and bottom[2] == 0.0  # 0.84 Ah to full, least charge


def test_cells_start_above_start_delta_and_stop_below_stop_delta():
    balancer = Balancer(CONFIG, 4, capacity_ah=5.0)
    soc = np.array([0.800, 0.8030, 0.8015, 0.800])  # 15 mAh and 7.5 mAh above the lowest
    assert balancer.update(0.0, soc, V, True, soc_std=SURE).tolist() == [False, True, False, False]
    soc = np.array([0.800, 0.8015, 0.8015, 0.800])  # cell 2 down to 7.5 mAh: keeps bleeding
    assert balancer.update(1.0, soc, V, True, soc_std=SURE).tolist() == [False, True, False, False]
    soc = np.array([0.800, 0.8009, 0.8015, 0.800])  # 4.5 mAh: below stop, off
    assert balancer.update(2.0, soc, V, True, soc_std=SURE).tolist() == [False, False, False, False]


def test_without_a_soc_estimate_the_voltages_decide():
    balancer = Balancer(CONFIG, 4, capacity_ah=5.0)
    soc = np.array([0.8, math.nan, 0.8, 0.8])
    cells_v = np.array([3.900, 3.915, 3.905, 3.900])
    assert balancer.update(0.0, soc, cells_v, True, soc_std=SURE).tolist() == [
        False,
        True,
        False,
        False,
    ]


def test_the_duty_cycle_bounds_the_heat():
    config = BalancingConfig(max_duty=0.3, duty_period_s=10.0)
    balancer = Balancer(config, 2, capacity_ah=5.0)
    soc = np.array([0.8, 0.81])
    on = [
        bool(balancer.update(t, soc, V[:2], True, soc_std=SURE)[1])
        for t in np.arange(0.0, 20.0, 1.0)
    ]
    assert on == [True] * 3 + [False] * 7 + [True] * 3 + [False] * 7


@pytest.mark.parametrize(
    ("cells_v", "temps_c", "current_a", "forbid", "expected"),
    [
        (V, T, 0.0, False, True),  # at rest
        (V, T, 5.0, False, True),  # charging
        (V, T, -5.0, False, False),  # discharging
        (V, T, math.nan, False, False),
        (np.array([3.9, 3.5, 3.9, 3.9]), T, 0.0, False, False),  # a cell too low
        (V, np.array([25.0, 46.0]), 0.0, False, False),  # too hot
        (V, np.array([25.0, math.nan]), 0.0, False, False),
        (V, T, 0.0, True, False),  # a fault forbids it
    ],
)
def test_when_balancing_is_allowed(cells_v, temps_c, current_a, forbid, expected):
    balancer = Balancer(CONFIG, 4, capacity_ah=5.0)
    assert balancer.allowed(cells_v, temps_c, current_a, 0.5, forbid) is expected


def test_not_allowed_stops_every_cell_and_forgets_the_selection():
    balancer = Balancer(CONFIG, 2, capacity_ah=5.0)
    soc = np.array([0.8, 0.81])
    assert balancer.update(0.0, soc, V[:2], True, soc_std=SURE).any()
    assert not balancer.update(1.0, soc, V[:2], False, soc_std=SURE).any()
    assert not balancer.selected.any()


def test_disabled_balancing_is_never_allowed():
    balancer = Balancer(BalancingConfig(enabled=False), 4, capacity_ah=5.0)
    assert balancer.allowed(V, T, 0.0, 0.5, False) is False


def test_hysteresis_must_be_ordered():
    with pytest.raises(ValidationError, match="stop_delta_ah must be below start_delta_ah"):
        BalancingConfig(start_delta_ah=0.01, stop_delta_ah=0.02)


def test_limits_are_strict_at_their_exact_values():
    balancer = Balancer(CONFIG, 4, capacity_ah=5.0)
    at_min_v = np.array([3.9, 3.6, 3.9, 3.9])  # exactly min_cell_voltage_v: not above it
    assert balancer.allowed(at_min_v, T, 0.0, 0.5, False) is False
    assert balancer.allowed(V, np.array([25.0, 45.0]), 0.0, 0.5, False) is False
    assert balancer.allowed(V, T, -0.5, 0.5, False) is False  # exactly -rest_current_a


def test_start_and_stop_thresholds_are_strict():
    config = BalancingConfig(max_duty=1.0, start_delta_ah=0.25, stop_delta_ah=0.125)
    balancer = Balancer(config, 2, capacity_ah=1.0)
    v = np.full(2, 3.9)
    assert not balancer.update(
        0.0, np.array([0.5, 0.75]), v, True, soc_std=SURE
    ).any()  # exactly start
    assert balancer.update(1.0, np.array([0.5, 0.875]), v, True, soc_std=SURE)[1]
    assert balancer.update(2.0, np.array([0.5, 0.625]), v, True, soc_std=SURE)[
        1
    ]  # exactly stop: keeps on


def test_voltage_fallback_thresholds():
    config = BalancingConfig(max_duty=1.0, voltage_start_delta_v=0.25)
    balancer = Balancer(config, 2, capacity_ah=5.0)
    soc = np.array([math.nan, math.nan])
    assert not balancer.update(
        0.0, soc, np.array([3.0, 3.25]), True, soc_std=SURE
    ).any()  # exactly start
    assert balancer.update(1.0, soc, np.array([3.0, 3.5]), True, soc_std=SURE)[1]
    assert balancer.update(2.0, soc, np.array([3.0, 3.125]), True, soc_std=SURE)[
        1
    ]  # exactly half: on
    assert not balancer.update(
        3.0, soc, np.array([3.0, 3.1]), True, soc_std=SURE
    ).any()  # below half: off


def test_an_estimate_not_sure_enough_gives_way_to_the_voltages():
    """SOC says cell 1 holds more, the voltages say cell 2 does; with one cell's sigma above
    trusted_soc_std (0.03) the voltages decide."""
    soc = np.array([0.5, 0.6, 0.5, 0.5])
    cells_v = np.array([3.9, 3.9, 3.95, 3.9])
    sure = Balancer(CONFIG, 4, capacity_ah=5.0)
    assert sure.update(0.0, soc, cells_v, True, soc_std=np.full(4, 0.03)).tolist() == [
        False,
        True,
        False,
        False,
    ]
    unsure = Balancer(CONFIG, 4, capacity_ah=5.0)
    soc_std = np.array([0.01, 0.031, 0.01, 0.01])
    assert unsure.update(0.0, soc, cells_v, True, soc_std=soc_std).tolist() == [
        False,
        False,
        True,
        False,
    ]


def test_the_bleed_current_is_each_bleeding_cells_voltage_over_its_resistor():
    bleeding = np.array([False, True, True])
    voltage_v = np.array([3.9, 3.3, math.nan])
    assert bleed_current_a(bleeding, voltage_v, 33.0) == pytest.approx([0.0, 0.1, 0.0])
    assert bleed_current_a(bleeding, voltage_v, None) is None  # not configured: not modelled
    assert bleed_current_a(np.zeros(3, dtype=bool), voltage_v, 33.0) is None
