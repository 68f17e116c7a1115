"""Validation of one sample: limit checks and plausibility, as raw (undebounced) conditions.

The result maps fault ids of the diagnosis table to "present this cycle"; the table debounces
them. NaN never passes a limit check silently: it is its own condition (``*_invalid``).
"""

from __future__ import annotations

import numpy as np

from bms.config import ProtectionConfig
from bms.types import Measurement

CELL_VOLTAGE_GROUP = "cell_voltage"
TEMPERATURE_GROUP = "temperature"
PACK_GROUP = "pack"


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


def measurement_conditions(
    m: Measurement, limits: ProtectionConfig, stuck: np.ndarray
) -> dict[str, bool]:
    """Raw conditions from one measurement against the protection limits."""
    v = m.cell_voltage_v
    t = m.cell_temp_c
    i = m.current_a
    v_valid = v[~np.isnan(v)]
    t_valid = t[~np.isnan(t)]
    cells_stale = CELL_VOLTAGE_GROUP in m.stale_groups
    temps_stale = TEMPERATURE_GROUP in m.stale_groups
    pack_stale = PACK_GROUP in m.stale_groups
    sum_mismatch = (
        not np.isnan(v).any()
        and not np.isnan(m.pack_voltage_v)
        and abs(float(v.sum()) - m.pack_voltage_v) > limits.pack_voltage_tolerance_v
    )
    return {
        "cell_overvoltage": bool(v_valid.size and v_valid.max() > limits.cell_voltage_max_v),
        "cell_undervoltage": bool(v_valid.size and v_valid.min() < limits.cell_voltage_min_v),
        "cell_voltage_invalid": bool(np.isnan(v).any()) and not cells_stale,
        "cell_voltage_stuck": bool(stuck.any()),
        "pack_voltage_mismatch": bool(sum_mismatch),
        "overtemperature": bool(t_valid.size and t_valid.max() > limits.temp_max_c),
        "undertemperature": bool(t_valid.size and t_valid.min() < limits.temp_min_c),
        "temperature_invalid": bool(np.isnan(t).any()) and not temps_stale,
        "charge_overcurrent": bool(i > limits.charge_current_max_a),
        "discharge_overcurrent": bool(-i > limits.discharge_current_max_a),
        "short_circuit": bool(abs(i) > limits.short_circuit_current_a),
        "current_invalid": bool(np.isnan(i)) and not pack_stale,
        "frontend_timeout": bool(m.stale_groups),
    }
