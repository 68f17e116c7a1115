"""Validation of one sample: limit checks and plausibility, as raw (undebounced) conditions.

The result maps fault ids of the diagnosis table to present (True), absent (False) or unknown
(None); the table debounces them. NaN never passes a limit check: it is its own condition
(``*_invalid``), and a limit check over NaN values is unknown, not clean.
"""

from __future__ import annotations

import numpy as np

from bms.config import ProtectionConfig
from bms.protection.limits import GRADED_QUANTITIES, GRADES, LimitSet
from bms.types import Estimate, Measurement


class StuckDetector:
    """Times, per cell, how long its reading has not changed while current flowed.

    Counted in seconds rather than cycles: at a loop faster than the front-end, a live reading
    legitimately repeats for several cycles.
    """

    def __init__(self, n_cells: int, stuck_time_s: float, min_current_a: float):
        self.stuck_time_s = stuck_time_s
        self.min_current_a = min_current_a
        self._last_v = np.full(n_cells, np.nan)
        self._unchanged_s = np.zeros(n_cells)

    def update(self, cell_voltage_v: np.ndarray, current_a: float, dt_s: float) -> np.ndarray:
        """Return a boolean mask (n_cells,) of cells whose reading is stuck."""
        if not abs(current_a) >= self.min_current_a:  # also False for NaN current
            self._unchanged_s[:] = 0.0
        else:
            same = cell_voltage_v == self._last_v  # NaN never equals, so NaN is not "stuck"
            self._unchanged_s = np.where(same, self._unchanged_s + dt_s, 0.0)
        self._last_v = cell_voltage_v.copy()
        return self._unchanged_s >= self.stuck_time_s


def _exceeds(values: np.ndarray, limit: float, above: bool) -> bool | None:
    """True if a valid value is beyond ``limit``; None if not, but some values are NaN (a NaN
    cell may be the one beyond it); False if every value is valid and within."""
    valid = values[~np.isnan(values)]
    if valid.size and (valid.max() > limit if above else valid.min() < limit):
        return True
    return None if valid.size < values.size else False


def _spread_exceeds(values: np.ndarray, limit: float) -> bool | None:
    """Highest minus lowest beyond ``limit``; a NaN can only widen the spread."""
    valid = values[~np.isnan(values)]
    if valid.size >= 2 and valid.max() - valid.min() > limit:
        return True
    return None if valid.size < values.size else False


def estimator_conditions(estimate: Estimate, limits: ProtectionConfig) -> dict[str, bool | None]:
    """A cell whose measured voltage is far from the model's prediction, in standard
    deviations of the prediction (unknown where the estimator skipped a cell)."""
    ratio = np.abs(estimate.innovation_v) / estimate.innovation_std_v
    beyond = _exceeds(ratio, limits.innovation_limit_sigma, above=True)
    return {
        "cell_model_mismatch": None if beyond is None else bool(beyond),
        "temperature_outside_model": bool(estimate.outside_model.any()),
    }


def _in_mode(check: bool | None, mode_applies: bool | None) -> bool | None:
    """A limit that applies only while charging (or only otherwise)."""
    if mode_applies is None:
        return None
    return check if mode_applies else False


def graded_conditions(
    m: Measurement, limits: LimitSet, n_parallel: int, rest_current_a: float
) -> dict[str, bool | None]:
    """Conditions of every graded row (quantity x MOL/RSL/MSL) of the limit set.

    Charge temperature limits apply while the current is above ``rest_current_a``; the
    discharge ones otherwise (discharging or at rest). Currents are compared per cell.
    """
    v, t, current_a = m.cell_voltage_v, m.cell_temp_c, m.current_a
    known = not np.isnan(current_a)
    charging = current_a > rest_current_a if known else None
    discharging_or_rest = (not charging) if known else None
    per_cell_a = current_a / n_parallel
    checks = {
        "cell_voltage_high_v": lambda lim: _exceeds(v, lim, above=True),
        "cell_voltage_low_v": lambda lim: _exceeds(v, lim, above=False),
        "temp_high_charge_c": lambda lim: _in_mode(_exceeds(t, lim, above=True), charging),
        "temp_low_charge_c": lambda lim: _in_mode(_exceeds(t, lim, above=False), charging),
        "temp_high_discharge_c": lambda lim: _in_mode(
            _exceeds(t, lim, above=True), discharging_or_rest
        ),
        "temp_low_discharge_c": lambda lim: _in_mode(
            _exceeds(t, lim, above=False), discharging_or_rest
        ),
        "charge_current_a": lambda lim: per_cell_a > lim if known else None,
        "discharge_current_a": lambda lim: -per_cell_a > lim if known else None,
        "temp_spread_c": lambda lim: _spread_exceeds(t, lim),
        "cell_voltage_spread_v": lambda lim: _spread_exceeds(v, lim),
    }
    conditions: dict[str, bool | None] = {}
    for quantity in GRADED_QUANTITIES:
        grades = getattr(limits, quantity.field)
        check = checks[quantity.field]
        for grade in GRADES:
            result = check(getattr(grades, grade))
            conditions[f"{quantity.fault_prefix}_{grade}"] = (
                None if result is None else bool(result)
            )
    return conditions


def measurement_conditions(
    m: Measurement,
    limits: ProtectionConfig,
    stuck: np.ndarray,
    interlock_closed: bool | None = None,
) -> dict[str, bool | None]:
    """Conditions that do not depend on the limit set: validity, plausibility, insulation and
    the interlock loop (each only where the config says the pack has one)."""
    conditions = _insulation_and_interlock(m.insulation_kohm, limits, interlock_closed)
    v = m.cell_voltage_v
    i = m.current_a
    current_known = not np.isnan(i)
    all_known = not np.isnan(v).any() and not np.isnan(m.pack_voltage_v)
    return conditions | {
        "cell_voltage_invalid": bool(np.isnan(v).any()),
        "cell_voltage_stuck": bool(stuck.any()),
        "pack_voltage_mismatch": (
            abs(float(v.sum()) - m.pack_voltage_v) > limits.pack_voltage_tolerance_v
            if all_known
            else None
        ),
        "temperature_invalid": bool(np.isnan(m.cell_temp_c).any()),
        "short_circuit": abs(i) > limits.short_circuit_current_a if current_known else None,
        "current_invalid": not current_known,
        "frontend_timeout": bool(m.stale_groups),
    }


def _insulation_and_interlock(
    insulation_kohm: float, limits: ProtectionConfig, interlock_closed: bool | None
) -> dict[str, bool | None]:
    conditions: dict[str, bool | None] = {}
    if limits.insulation_error_kohm is not None:
        known = not np.isnan(insulation_kohm)
        conditions["insulation_invalid"] = not known
        conditions["insulation_warning"] = (
            insulation_kohm < limits.insulation_warning_kohm if known else None
        )
        conditions["insulation_error"] = (
            insulation_kohm < limits.insulation_error_kohm if known else None
        )
    if limits.interlock:
        conditions["interlock_open"] = None if interlock_closed is None else not interlock_closed
    return conditions
