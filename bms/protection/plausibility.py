"""Validation of one sample: limit checks and plausibility, as raw (undebounced) conditions.

The result maps fault ids of the diagnosis table to present (True), absent (False) or unknown
(None); the table debounces them. NaN never passes a limit check: it is its own condition
(``*_invalid``), and a limit check over NaN values is unknown, not clean.
"""

from __future__ import annotations

import math

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


class ChargeCrossCheck:
    """Checks the current sensor against the estimator: over a window of ``window_s``, the
    change of the pack's mean SOC that the cell voltages show (the EKF's corrections
    included) against the charge the sensor counted. A sensor with an offset or a gain error
    makes the EKF correct the same way, window after window; the mean current that would
    explain the difference is the sensor's apparent error.

    Each verdict holds until the next window closes. A window with an unknown current, an
    unknown SOC, an estimate not yet sure of itself (SOC sigma above ``max_soc_std``) or a
    cell restarted from its OCV gives no verdict (None) and starts again, and the first
    window after such a start is not judged (the filter is still settling onto the voltages).
    The EKF follows only a part of a sensor error (it trusts the current too), so the
    apparent error understates the real one; where the OCV is flat the voltages say little
    and the check can miss an error.
    """

    def __init__(
        self, window_s: float, capacity_ah: float, tolerance_a: float, max_soc_std: float = 0.05
    ):
        self.window_s = window_s
        self.capacity_as = capacity_ah * 3600.0
        self.tolerance_a = tolerance_a
        self.max_soc_std = max_soc_std
        self.apparent_error_a = math.nan
        """The last closed window's mean (SOC-implied minus measured) current, A."""
        self._verdict: bool | None = None
        self._restart()

    def _restart(self) -> None:
        """The next good sample opens a window, which only settles the filter."""
        self._start_soc = math.nan
        self._settled = False

    def update(self, current_a: float, estimate: Estimate, dt_s: float) -> bool | None:
        """One cycle with the measured pack current (A). Returns the condition: True, False,
        or None (no verdict)."""
        mean_soc = float(np.mean(estimate.soc))
        sure = bool(np.all(estimate.soc_std <= self.max_soc_std))  # False for NaN
        if math.isnan(current_a) or math.isnan(mean_soc) or not sure or estimate.restarted.any():
            self._restart()
            self._verdict = None
            return None
        if math.isnan(self._start_soc):
            self._start_soc = mean_soc
            self._elapsed_s = 0.0
            self._counted_as = 0.0
            return self._verdict
        self._elapsed_s += dt_s
        self._counted_as += current_a * dt_s
        if self._elapsed_s >= self.window_s:
            if self._settled:
                implied_as = (mean_soc - self._start_soc) * self.capacity_as
                self.apparent_error_a = (implied_as - self._counted_as) / self._elapsed_s
                self._verdict = abs(self.apparent_error_a) > self.tolerance_a
            self._start_soc = mean_soc
            self._elapsed_s = 0.0
            self._counted_as = 0.0
            self._settled = True
        return self._verdict


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


def _in_mode(
    values: np.ndarray, limit: float, other_mode_limit: float, above: bool, applies: bool | None
) -> bool | None:
    """A temperature limit that applies only while charging (or only otherwise). When the
    current is unknown, so is the mode: beyond the limits of both modes is present (whatever
    the mode, a limit of this grade is broken), within both is clean, between is unknown."""
    if applies is not None:
        return _exceeds(values, limit, above) if applies else False
    lenient, strict = sorted((limit, other_mode_limit), reverse=above)
    if _exceeds(values, lenient, above):
        return True
    return False if _exceeds(values, strict, above) is False else None


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

    def at(field: str, grade: str) -> float:
        return getattr(getattr(limits, field), grade)

    def temperature(other_mode_field: str, above: bool, applies: bool | None):
        return lambda limit, grade: _in_mode(t, limit, at(other_mode_field, grade), above, applies)

    checks = {
        "cell_voltage_high_v": lambda limit, _: _exceeds(v, limit, above=True),
        "cell_voltage_low_v": lambda limit, _: _exceeds(v, limit, above=False),
        "temp_high_charge_c": temperature("temp_high_discharge_c", True, charging),
        "temp_low_charge_c": temperature("temp_low_discharge_c", False, charging),
        "temp_high_discharge_c": temperature("temp_high_charge_c", True, discharging_or_rest),
        "temp_low_discharge_c": temperature("temp_low_charge_c", False, discharging_or_rest),
        "charge_current_a": lambda limit, _: per_cell_a > limit if known else None,
        "discharge_current_a": lambda limit, _: -per_cell_a > limit if known else None,
        "temp_spread_c": lambda limit, _: _spread_exceeds(t, limit),
        "cell_voltage_spread_v": lambda limit, _: _spread_exceeds(v, limit),
    }
    conditions: dict[str, bool | None] = {}
    for quantity in GRADED_QUANTITIES:
        check = checks[quantity.field]
        for grade in GRADES:
            result = check(at(quantity.field, grade), grade)
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
    conditions |= _redundant_current(m.current_a, m.redundant_current_a, limits)
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


def _redundant_current(
    current_a: float, redundant_a: float, limits: ProtectionConfig
) -> dict[str, bool | None]:
    """Two current sensors must agree within the tolerance (plus a fraction of the current,
    as the two are sampled at slightly different times); only where the config says the
    front-end has a second sensor."""
    if limits.redundant_current_tolerance_a is None:
        return {}
    redundant_known = not math.isnan(redundant_a)
    if redundant_known and not math.isnan(current_a):
        tolerance_a = limits.redundant_current_tolerance_a
        tolerance_a += limits.redundant_current_tolerance_fraction * abs(current_a)
        mismatch: bool | None = abs(current_a - redundant_a) > tolerance_a
    else:
        mismatch = None
    return {"current_mismatch": mismatch, "current_redundant_invalid": not redundant_known}
