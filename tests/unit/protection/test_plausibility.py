"""Limit and plausibility conditions from one measurement, and the stuck-sensor timer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bms.config import ProtectionConfig
from bms.protection.plausibility import StuckDetector, measurement_conditions
from bms.types import Measurement

LIMITS = ProtectionConfig(
    cell_voltage_max_v=4.25,
    cell_voltage_min_v=2.7,
    temp_max_c=60.0,
    temp_min_c=-20.0,
    charge_current_max_a=15.0,
    discharge_current_max_a=30.0,
    short_circuit_current_a=100.0,
    pack_voltage_tolerance_v=0.5,
)
NO_STUCK = np.zeros(4, dtype=bool)


def sample(**changes) -> Measurement:
    values = dict(
        t_s=1.0,
        cell_voltage_v=np.array([3.7, 3.71, 3.69, 3.7]),
        cell_temp_c=np.array([25.0, 26.0]),
        current_a=-5.0,
        pack_voltage_v=14.8,
        link_voltage_v=14.8,
    )
    values.update(changes)
    return Measurement(**values)


def raised(m: Measurement, stuck=NO_STUCK) -> set[str]:
    return {k for k, v in measurement_conditions(m, LIMITS, stuck).items() if v}


def test_healthy_sample_raises_nothing():
    assert raised(sample()) == set()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"cell_voltage_v": np.array([3.7, 4.26, 3.69, 3.7]), "pack_voltage_v": 15.35},
            {"cell_overvoltage"},
        ),
        (
            {"cell_voltage_v": np.array([3.7, 2.69, 3.69, 3.7]), "pack_voltage_v": 13.78},
            {"cell_undervoltage"},
        ),
        ({"cell_temp_c": np.array([25.0, 60.5])}, {"overtemperature"}),
        ({"cell_temp_c": np.array([-20.5, 25.0])}, {"undertemperature"}),
        ({"current_a": 15.5}, {"charge_overcurrent"}),
        ({"current_a": -30.5}, {"discharge_overcurrent"}),
        ({"current_a": -101.0}, {"discharge_overcurrent", "short_circuit"}),
        ({"current_a": math.nan}, {"current_invalid"}),
        ({"cell_temp_c": np.array([25.0, math.nan])}, {"temperature_invalid"}),
        ({"pack_voltage_v": 15.5}, {"pack_voltage_mismatch"}),
    ],
)
def test_each_limit_raises_its_own_condition(changes, expected):
    assert raised(sample(**changes)) == expected


def test_nan_cell_is_invalid_and_never_passes_as_in_range():
    m = sample(cell_voltage_v=np.array([3.7, math.nan, 3.69, 3.7]))
    # the sum check needs every cell, so only the invalid cell is reported
    assert raised(m) == {"cell_voltage_invalid"}


def test_all_cells_nan_cannot_hide_an_overvoltage_check():
    m = sample(cell_voltage_v=np.full(4, math.nan))
    assert raised(m) == {"cell_voltage_invalid"}


def test_stale_values_are_a_timeout_and_missing():
    m = sample(
        cell_voltage_v=np.full(4, math.nan),
        current_a=math.nan,
        stale_groups=("cell_voltage", "pack"),
    )
    assert raised(m) == {"frontend_timeout", "cell_voltage_invalid", "current_invalid"}


def test_limit_checks_over_missing_values_are_unknown_not_clean():
    conditions = measurement_conditions(
        sample(cell_voltage_v=np.array([3.7, math.nan, 3.69, 3.7]), current_a=math.nan),
        LIMITS,
        NO_STUCK,
    )
    for fault_id in (
        "cell_overvoltage",
        "cell_undervoltage",
        "pack_voltage_mismatch",
        "charge_overcurrent",
        "discharge_overcurrent",
        "short_circuit",
    ):
        assert conditions[fault_id] is None, fault_id
    assert conditions["overtemperature"] is False  # temperatures are all valid
    # a valid cell beyond the limit is present whatever the others read
    conditions = measurement_conditions(
        sample(cell_voltage_v=np.array([4.3, math.nan, 3.69, 3.7])), LIMITS, NO_STUCK
    )
    assert conditions["cell_overvoltage"] is True


def test_stuck_mask_raises_stuck():
    assert raised(sample(), stuck=np.array([False, True, False, False])) == {"cell_voltage_stuck"}


def test_stuck_detector_needs_current_and_time():
    detector = StuckDetector(n_cells=2, stuck_time_s=0.95, min_current_a=1.0)
    frozen = np.array([3.7, 3.7])
    live = iter(np.linspace(3.6, 3.7, 100))
    for _ in range(10):  # 0.9 s unchanged while current flows (the first sets the baseline)
        stuck = detector.update(np.array([frozen[0], next(live)]), -5.0, 0.1)
    assert not stuck.any()
    stuck = detector.update(np.array([frozen[0], next(live)]), -5.0, 0.1)
    assert stuck.tolist() == [True, False]
    # at rest a constant reading is expected: the timer resets
    assert not detector.update(frozen, 0.2, 0.1).any()
    assert not detector.update(frozen, math.nan, 0.1).any()


def test_stuck_detector_ignores_nan():
    detector = StuckDetector(n_cells=1, stuck_time_s=0.3, min_current_a=1.0)
    for _ in range(10):
        stuck = detector.update(np.array([math.nan]), -5.0, 0.1)
    assert not stuck.any()
