"""Validation of one sample: limit checks and plausibility, as raw (undebounced) conditions.

The result maps fault ids of the diagnosis table to present (True), absent (False) or unknown
(None); the table debounces them. NaN never passes a limit check: it is its own condition
(``*_invalid``), and a limit check over NaN values is unknown, not clean.
"""

from __future__ import annotations

import numpy as np

from bms.config import ProtectionConfig
from bms.types import Measurement


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


def measurement_conditions(
    m: Measurement, limits: ProtectionConfig, stuck: np.ndarray
) -> dict[str, bool | None]:
    """Raw conditions from one measurement: True present, False absent, None unknown."""
    v = m.cell_voltage_v
    t = m.cell_temp_c
    i = m.current_a
    current_known = not np.isnan(i)
    all_known = not np.isnan(v).any() and not np.isnan(m.pack_voltage_v)
    return {
        "cell_overvoltage": _exceeds(v, limits.cell_voltage_max_v, above=True),
        "cell_undervoltage": _exceeds(v, limits.cell_voltage_min_v, above=False),
        "cell_voltage_invalid": bool(np.isnan(v).any()),
        "cell_voltage_stuck": bool(stuck.any()),
        "pack_voltage_mismatch": (
            abs(float(v.sum()) - m.pack_voltage_v) > limits.pack_voltage_tolerance_v
            if all_known
            else None
        ),
        "overtemperature": _exceeds(t, limits.temp_max_c, above=True),
        "undertemperature": _exceeds(t, limits.temp_min_c, above=False),
        "temperature_invalid": bool(np.isnan(t).any()),
        "charge_overcurrent": i > limits.charge_current_max_a if current_known else None,
        "discharge_overcurrent": -i > limits.discharge_current_max_a if current_known else None,
        "short_circuit": abs(i) > limits.short_circuit_current_a if current_known else None,
        "current_invalid": not current_known,
        "frontend_timeout": bool(m.stale_groups),
    }
