"""Conditions from one measurement: validity, plausibility, and every graded limit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bms.config import ProtectionConfig
from bms.protection.limits import GRADED_QUANTITIES, GRADES, load_limit_set
from bms.protection.plausibility import (
    StuckDetector,
    estimator_conditions,
    graded_conditions,
    measurement_conditions,
)
from bms.types import Measurement
from tests.conftest import REPO
from tests.fakes import estimate_of

LIMIT_FILE = REPO / "config" / "limits" / "nmc.toml"
LIMITS = load_limit_set(LIMIT_FILE)
PROTECTION = ProtectionConfig(
    limits=LIMIT_FILE,
    latch_file="unused.json",
    short_circuit_current_a=100.0,
    pack_voltage_tolerance_v=0.5,
)
NO_STUCK = np.zeros(4, dtype=bool)
REST_A = 0.5


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


def raised(m: Measurement, stuck=NO_STUCK, n_parallel=1) -> set[str]:
    conditions = measurement_conditions(m, PROTECTION, stuck)
    conditions.update(graded_conditions(m, LIMITS, n_parallel, REST_A))
    return {k for k, v in conditions.items() if v}


def test_healthy_sample_raises_nothing():
    assert raised(sample()) == set()


def grades_up_to(prefix: str, grade: str) -> set[str]:
    return {f"{prefix}_{g}" for g in GRADES[: GRADES.index(grade) + 1]}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"cell_voltage_v": np.array([4.10, 4.16, 4.12, 4.14]), "pack_voltage_v": 16.52},
            grades_up_to("cell_voltage_high", "mol"),
        ),
        (
            {"cell_voltage_v": np.array([3.7, 3.91, 3.69, 3.7]), "pack_voltage_v": 15.0},
            grades_up_to("cell_voltage_spread", "rsl"),
        ),
        (
            {"cell_voltage_v": np.array([4.26, 4.26, 4.26, 4.26]), "pack_voltage_v": 17.04},
            grades_up_to("cell_voltage_high", "msl"),
        ),
        (
            {"cell_voltage_v": np.array([2.9, 2.9, 2.9, 2.9]), "pack_voltage_v": 11.6},
            grades_up_to("cell_voltage_low", "mol"),
        ),
        (
            {"cell_voltage_v": np.array([2.4, 2.4, 2.4, 2.4]), "pack_voltage_v": 9.6},
            grades_up_to("cell_voltage_low", "msl"),
        ),
        ({"cell_temp_c": np.array([57.0, 57.0])}, grades_up_to("temp_high_discharge", "mol")),
        ({"cell_temp_c": np.array([66.0, 66.0])}, grades_up_to("temp_high_discharge", "msl")),
        ({"cell_temp_c": np.array([-21.0, -21.0])}, grades_up_to("temp_low_discharge", "msl")),
        (
            {"cell_temp_c": np.array([46.0, 46.0]), "current_a": 5.0},
            grades_up_to("temp_high_charge", "mol"),
        ),
        (
            {"cell_temp_c": np.array([4.0, 4.0]), "current_a": 5.0},
            grades_up_to("temp_low_charge", "rsl"),
        ),
        ({"current_a": 11.0}, grades_up_to("charge_current", "mol")),
        ({"current_a": -31.0}, grades_up_to("discharge_current", "msl")),
        ({"current_a": -101.0}, grades_up_to("discharge_current", "msl") | {"short_circuit"}),
        ({"cell_temp_c": np.array([20.0, 29.0])}, grades_up_to("temp_spread", "rsl")),
        ({"current_a": math.nan}, {"current_invalid"}),
        ({"cell_temp_c": np.array([25.0, math.nan])}, {"temperature_invalid"}),
        ({"pack_voltage_v": 15.5}, {"pack_voltage_mismatch"}),
    ],
)
def test_each_limit_raises_its_own_rows(changes, expected):
    assert raised(sample(**changes)) == expected


def test_charge_temperature_limits_apply_only_while_charging():
    cold = np.array([4.0, 4.0])  # below the charge RSL, fine for discharge
    assert raised(sample(cell_temp_c=cold, current_a=-5.0)) == set()
    assert raised(sample(cell_temp_c=cold, current_a=0.2)) == set()  # at rest
    assert "temp_low_charge_rsl" in raised(sample(cell_temp_c=cold, current_a=0.6))


def test_currents_are_compared_per_cell():
    assert "discharge_current_msl" in raised(sample(current_a=-31.0), n_parallel=1)
    assert not raised(sample(current_a=-31.0), n_parallel=2) & {"discharge_current_mol"}


def test_every_graded_row_has_a_condition():
    conditions = graded_conditions(sample(), LIMITS, 1, REST_A)
    expected = {f"{q.fault_prefix}_{g}" for q in GRADED_QUANTITIES for g in GRADES}
    assert set(conditions) == expected


def test_nan_cell_is_invalid_and_never_passes_as_in_range():
    m = sample(cell_voltage_v=np.array([3.7, math.nan, 3.69, 3.7]))
    assert raised(m) == {"cell_voltage_invalid"}


def test_stale_values_are_a_timeout_and_missing():
    m = sample(
        cell_voltage_v=np.full(4, math.nan),
        current_a=math.nan,
        stale_groups=("cell_voltage", "pack"),
    )
    assert raised(m) == {"frontend_timeout", "cell_voltage_invalid", "current_invalid"}


def test_limit_checks_over_missing_values_are_unknown_not_clean():
    m = sample(cell_voltage_v=np.array([3.7, math.nan, 3.69, 3.7]), current_a=math.nan)
    conditions = measurement_conditions(m, PROTECTION, NO_STUCK)
    conditions.update(graded_conditions(m, LIMITS, 1, REST_A))
    for fault_id in (
        "cell_voltage_high_msl",
        "cell_voltage_low_msl",
        "pack_voltage_mismatch",
        "charge_current_msl",
        "discharge_current_msl",
        "short_circuit",
        "cell_voltage_spread_msl",
        "temp_high_discharge_msl",
        "temp_high_charge_msl",
    ):
        assert conditions[fault_id] is None, fault_id
    assert conditions["temp_spread_msl"] is False  # temperatures are all valid
    # a valid cell beyond the limit is present whatever the others read
    m = sample(cell_voltage_v=np.array([4.3, math.nan, 3.69, 3.7]))
    assert graded_conditions(m, LIMITS, 1, REST_A)["cell_voltage_high_msl"] is True


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


def test_model_mismatch_counts_standard_deviations_either_way():
    config = ProtectionConfig.model_construct(innovation_limit_sigma=6.0)

    def mismatch(innovation_v, innovation_std_v):
        estimate = estimate_of([0.5] * len(innovation_v))
        estimate.innovation_v[:] = innovation_v
        estimate.innovation_std_v[:] = innovation_std_v
        conditions = estimator_conditions(estimate, config)
        assert conditions["temperature_outside_model"] is False
        return conditions["cell_model_mismatch"]

    assert mismatch([0.001, 0.06], [0.01, 0.01]) is False  # 6.0 sigma: at the limit, not past
    assert mismatch([0.001, 0.0601], [0.01, 0.01]) is True
    assert mismatch([-0.07, 0.0], [0.01, 0.01]) is True  # below the prediction counts too
    assert mismatch([0.07, 0.0], [0.02, 0.01]) is False  # 3.5 sigma of a wider prediction
    assert mismatch([np.nan, 0.0], [np.nan, 0.01]) is None  # a skipped cell may be the one
    assert mismatch([np.nan, 0.09], [np.nan, 0.01]) is True


def test_a_cell_outside_the_models_temperatures_is_reported():
    config = ProtectionConfig.model_construct(innovation_limit_sigma=6.0)
    estimate = estimate_of([0.5, 0.5, 0.5])
    assert estimator_conditions(estimate, config)["temperature_outside_model"] is False
    estimate.outside_model[2] = True
    assert estimator_conditions(estimate, config)["temperature_outside_model"] is True
