"""Conditions from one measurement: validity, plausibility, and every graded limit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bms.config import ProtectionConfig, load_limit_set
from bms.protection.limits import GRADED_QUANTITIES, GRADES
from bms.protection.plausibility import (
    ChargeCrossCheck,
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
    ):
        assert conditions[fault_id] is None, fault_id
    # temperatures are all valid and within the limits of either mode
    for fault_id in ("temp_spread_msl", "temp_high_discharge_msl", "temp_high_charge_msl"):
        assert conditions[fault_id] is False, fault_id
    # a valid cell beyond the limit is present whatever the others read
    m = sample(cell_voltage_v=np.array([4.3, math.nan, 3.69, 3.7]))
    assert graded_conditions(m, LIMITS, 1, REST_A)["cell_voltage_high_msl"] is True


def test_unknown_current_still_trips_a_temperature_beyond_both_modes_limits():
    """Charge and discharge temperature limits differ; with the current unknown the mode is
    too, but a cell beyond both modes' MSLs is beyond an MSL whatever the mode."""
    high_charge, high_discharge = LIMITS.temp_high_charge_c.msl, LIMITS.temp_high_discharge_c.msl
    low_charge, low_discharge = LIMITS.temp_low_charge_c.msl, LIMITS.temp_low_discharge_c.msl
    assert high_charge != high_discharge and low_charge != low_discharge  # the test needs it

    def msl_rows(temp_c: float) -> dict[str, bool | None]:
        m = sample(cell_temp_c=np.array([25.0, temp_c]), current_a=math.nan)
        conditions = graded_conditions(m, LIMITS, 1, REST_A)
        return {k: v for k, v in conditions.items() if k.startswith("temp_") and "msl" in k}

    beyond_both = msl_rows(max(high_charge, high_discharge) + 1.0)
    assert beyond_both["temp_high_charge_msl"] is True
    assert beyond_both["temp_high_discharge_msl"] is True
    between = msl_rows((high_charge + high_discharge) / 2)
    assert between["temp_high_charge_msl"] is None
    assert between["temp_high_discharge_msl"] is None
    below_both = msl_rows(min(low_charge, low_discharge) - 1.0)
    assert below_both["temp_low_charge_msl"] is True
    assert below_both["temp_low_discharge_msl"] is True
    within_both = msl_rows(25.0)
    assert within_both["temp_high_charge_msl"] is False
    assert within_both["temp_low_discharge_msl"] is False


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


REDUNDANT = PROTECTION.model_copy(
    update={"redundant_current_tolerance_a": 1.0, "redundant_current_tolerance_fraction": 0.05}
)


def redundant_rows(current_a: float, redundant_a: float) -> dict[str, bool | None]:
    m = sample(current_a=current_a, redundant_current_a=redundant_a)
    conditions = measurement_conditions(m, REDUNDANT, NO_STUCK)
    return {k: conditions[k] for k in ("current_mismatch", "current_redundant_invalid")}


def test_two_current_sensors_must_agree_within_the_tolerance_and_its_fraction():
    # at -20 A the band is 1 A + 5 % of 20 A = 2 A
    assert redundant_rows(-20.0, -21.9) == {
        "current_mismatch": False,
        "current_redundant_invalid": False,
    }
    assert redundant_rows(-20.0, -22.1)["current_mismatch"] is True
    assert redundant_rows(0.0, 1.1)["current_mismatch"] is True  # 1 A band at rest
    assert redundant_rows(0.0, 0.9)["current_mismatch"] is False


def test_a_missing_second_sensor_is_its_own_warning_and_no_verdict():
    assert redundant_rows(-20.0, math.nan) == {
        "current_mismatch": None,
        "current_redundant_invalid": True,
    }
    assert redundant_rows(math.nan, -20.0)["current_mismatch"] is None


def test_without_a_second_sensor_configured_nothing_is_checked():
    conditions = measurement_conditions(sample(), PROTECTION, NO_STUCK)
    assert "current_mismatch" not in conditions
    assert "current_redundant_invalid" not in conditions


CAPACITY_AH = 5.0


def run_charge_check(
    check: ChargeCrossCheck, sensor_error_a: float, seconds: float, true_current_a=-5.0, soc=0.8
):
    """A pack whose SOC follows the true current, seen through a sensor that reads
    ``sensor_error_a`` off; returns the verdicts of each 1 s step and the final SOC."""
    verdicts = []
    for _ in range(int(seconds)):
        soc += true_current_a / (CAPACITY_AH * 3600.0)
        verdicts.append(
            check.update(true_current_a + sensor_error_a, estimate_of(np.full(4, soc)), 1.0)
        )
    return verdicts, soc


def test_charge_check_finds_a_sensor_offset_and_passes_a_good_sensor():
    check = ChargeCrossCheck(window_s=100.0, capacity_ah=CAPACITY_AH, tolerance_a=0.5)
    verdicts, _ = run_charge_check(check, 0.0, 350)
    # the first window after the start settles; the second is the first judged
    assert verdicts[0] is None and verdicts[199] is None
    assert verdicts[200:] == [False] * len(verdicts[200:])
    assert abs(check.apparent_error_a) < 1e-9
    check = ChargeCrossCheck(window_s=100.0, capacity_ah=CAPACITY_AH, tolerance_a=0.5)
    verdicts, _ = run_charge_check(check, 0.6, 250)
    assert verdicts[199] is None and verdicts[200] is True and verdicts[-1] is True
    # the sensor reads 0.6 A too high, so the SOC moves 0.6 A less than it counts
    assert check.apparent_error_a == pytest.approx(-0.6)
    check = ChargeCrossCheck(window_s=100.0, capacity_ah=CAPACITY_AH, tolerance_a=0.5)
    verdicts, _ = run_charge_check(check, -0.4, 250)
    assert verdicts[200] is False


def test_charge_check_gives_no_verdict_for_unsure_restarted_or_unknown_inputs():
    check = ChargeCrossCheck(window_s=10.0, capacity_ah=CAPACITY_AH, tolerance_a=0.5)
    assert run_charge_check(check, 2.0, 30)[0][-1] is True
    assert check.update(-5.0, estimate_of(np.full(4, 0.8), soc_std=0.2), 1.0) is None
    run_charge_check(check, 2.0, 30)
    assert check.update(math.nan, estimate_of(np.full(4, 0.8)), 1.0) is None
    assert check.update(-5.0, estimate_of(np.array([0.8, math.nan, 0.8, 0.8])), 1.0) is None
    verdicts, soc = run_charge_check(check, 2.0, 30)
    assert verdicts[-1] is True
    restarted = estimate_of(np.full(4, soc + 0.05))  # an OCV restart jumps the SOC
    restarted.restarted[1] = True
    assert check.update(-5.0, restarted, 1.0) is None
    verdicts, _ = run_charge_check(check, 0.0, 30, soc=soc + 0.05)
    assert verdicts[-1] is False  # the jump was never counted as a sensor error
