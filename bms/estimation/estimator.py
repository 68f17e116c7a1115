"""The pack's cell estimator: the EKF and state-of-power kernels with the state between cycles.

Cells start from the OCV of their first valid voltage (the service assumes a rested pack at
boot) or from a given SOC, and are re-initialised from OCV after a long enough rest. Each cell
takes the temperature of the sensor that covers it. A group of ``n_parallel`` cells is
estimated as one cell carrying its share of the pack current; limits are scaled back to the
group.
"""

from __future__ import annotations

import math

import numpy as np

from bms.estimation import ecm
from bms.estimation.cell_params import CellParams
from bms.estimation.ekf import ekf_step
from bms.estimation.power import power_limits
from bms.types import POWER_DURATIONS_S, Estimate

DEFAULT_TEMP_C = 25.0
"""A cell's temperature until any sensor has reported."""
INITIAL_RC_STD_V = 0.01
"""Polarisation we cannot rule out when a cell is first seen."""
POWER_CAP_C_RATE = 20.0
"""State of power is not searched beyond this from the ECM: no cell of ours carries more.
From a power map, the largest current its test pulsed is the cap."""
MODEL_TEMP_MARGIN_C = 5.0
"""How far beyond its coldest or hottest characterised temperature a cell may be before its
estimate counts as outside the model."""
POWER_REFRESH_S = 0.1
"""Every cell's state of power is recomputed at least this often. It moves with the
polarisation over seconds, so a fast loop over a large pack spreads the cells over cycles
rather than spend a millisecond per cycle on 1,000 cells."""


class PackEstimator:
    """EKF state of ``n_cells`` series groups of ``n_parallel`` cells of type ``cell``."""

    def __init__(
        self,
        cell: CellParams,
        n_cells: int,
        n_temp_sensors: int,
        rest_current_a: float,
        rest_time_s: float,
        n_parallel: int = 1,
        period_s: float = POWER_REFRESH_S,
        voltage_window_v: tuple[float, float] | None = None,
    ):
        """``period_s``: the loop's period; with it, the state of power of
        ``n_cells * period_s / POWER_REFRESH_S`` cells (at least one) is updated per step.
        ``voltage_window_v``: (low, high) cell voltage the state of power must keep to, such as
        the limit set's operating limits; it is narrowed to the cell's own limits, which are
        the default."""
        self.cell = cell
        low_v, high_v = voltage_window_v or (cell.voltage_min_v, cell.voltage_max_v)
        self.power_voltage_min_v = max(low_v, cell.voltage_min_v)
        self.power_voltage_max_v = min(high_v, cell.voltage_max_v)
        self._tables = tuple(cell.tables)
        self._power_map = tuple(cell.power_map)
        self.power_cap_a = (
            float(cell.power_map.current_a[-1])
            if cell.has_power_map
            else POWER_CAP_C_RATE * cell.capacity_ah
        )
        self._tuning = tuple(cell.tuning)
        self.power_cells_per_step = max(
            1, min(n_cells, math.ceil(n_cells * period_s / POWER_REFRESH_S))
        )
        self._power_cursor = 0
        self.n_parallel = n_parallel
        self.rest_current_a = rest_current_a
        self.rest_time_s = rest_time_s
        self.capacity_ah = np.full(n_cells, cell.capacity_ah)
        self.sensor_of_cell = (np.arange(n_cells) * n_temp_sensors) // n_cells
        self.x = np.zeros((n_cells, 3))
        self.p = np.zeros((n_cells, 3, 3))
        self.known = np.zeros(n_cells, dtype=bool)
        self.temp_c = np.full(n_cells, DEFAULT_TEMP_C)
        self.previous_current_a = np.full(n_cells, math.nan)
        self.rest_elapsed_s = 0.0
        self.rest_reinitialised = False
        self.durations_s = np.array(POWER_DURATIONS_S)
        self._update = np.zeros((n_cells, 3))
        """Per cell: innovation (V), its sigma (V), seconds gated in a row (see ekf_step)."""
        self._update[:, :2] = math.nan
        self._charge_a = np.zeros((n_cells, len(POWER_DURATIONS_S)))
        self._discharge_a = np.zeros((n_cells, len(POWER_DURATIONS_S)))

    def unknown(self) -> Estimate:
        """The estimate before any cell has been seen: every value NaN (each field its own
        array, so that no consumer's change to one shows in another)."""
        n_cells = self.x.shape[0]
        cells = [np.full(n_cells, math.nan) for _ in range(4)]
        limits = [np.full(self._charge_a.shape, math.nan) for _ in range(2)]
        return Estimate(
            *cells, *limits, np.zeros(n_cells, dtype=bool), np.zeros(n_cells, dtype=bool)
        )

    def set_soc(self, soc: np.ndarray | float, soc_std: np.ndarray | float | None = None) -> None:
        """Start every cell at ``soc`` (at rest) with the SOC sigma ``soc_std`` (scalars or
        (n_cells,)), e.g. from a persisted state or the user."""
        std = self.cell.tuning.initial_soc_std if soc_std is None else soc_std
        self.x[:] = 0.0
        self.x[:, 0] = soc
        self.p[:] = 0.0
        self.p[:, 0, 0] = np.square(std)
        self.p[:, 1, 1] = self.p[:, 2, 2] = INITIAL_RC_STD_V**2
        self.known[:] = True

    def step(
        self,
        pack_current_a: float,
        cell_voltage_v: np.ndarray,
        sensor_temp_c: np.ndarray,
        dt_s: float,
        bleed_current_a: np.ndarray | None = None,
    ) -> Estimate:
        """Advance by ``dt_s`` seconds: ``pack_current_a`` (positive charging, NaN unknown),
        cell voltages (n_cells,) and temperature sensors (n_temp_sensors,), NaN where invalid.
        ``bleed_current_a`` (n_cells,): what each series group's balancing resistor draws out
        of it (A, positive), a current inside the pack that the pack current does not carry.
        """
        cell_current_a = pack_current_a / self.n_parallel
        self._update_temperatures(sensor_temp_c)
        self._track_rest(cell_current_a, dt_s)
        current_a = np.full(self.x.shape[0], cell_current_a)
        if bleed_current_a is not None:
            current_a -= bleed_current_a / self.n_parallel
        ekf_step(
            self._tables,
            self._tuning,
            self.capacity_ah,
            self.x,
            self.p,
            self.previous_current_a,
            current_a,
            cell_voltage_v,
            self.temp_c,
            dt_s,
            self._update,
        )
        self.previous_current_a = current_a
        started = self._initialise_from_ocv(cell_current_a, cell_voltage_v)
        self._update[started, 0] = math.nan  # the update ran on a state now replaced
        self._update[started, 2] = 0.0
        n_cells = self.x.shape[0]
        # When cells (re)start, every cell's state of power is brought up to date at once.
        count = n_cells if started.any() else self.power_cells_per_step
        power_limits(
            self._tables,
            self._power_map,
            self.capacity_ah,
            self.x,
            self.temp_c,
            self.power_voltage_min_v,
            self.power_voltage_max_v,
            self.power_cap_a,
            self.durations_s,
            self._power_cursor,
            count,
            self._charge_a,
            self._discharge_a,
        )
        self._power_cursor = (self._power_cursor + count) % n_cells
        unknown = ~self.known
        soc = np.clip(self.x[:, 0], 0.0, 1.0)
        soc[unknown] = math.nan
        soc_std = np.sqrt(self.p[:, 0, 0])
        soc_std[unknown] = math.nan
        charge_a = self._charge_a * self.n_parallel
        discharge_a = self._discharge_a * self.n_parallel
        charge_a[unknown] = math.nan
        discharge_a[unknown] = math.nan
        innovation_v = self._update[:, 0].copy()
        innovation_v[unknown] = math.nan
        temps = self.cell.tables.imp_temp_c
        outside = (self.temp_c < temps[0] - MODEL_TEMP_MARGIN_C) | (
            self.temp_c > temps[-1] + MODEL_TEMP_MARGIN_C
        )
        return Estimate(
            soc,
            soc_std,
            innovation_v,
            self._update[:, 1].copy(),
            charge_a,
            discharge_a,
            outside,
            started,
        )

    def _update_temperatures(self, sensor_temp_c: np.ndarray) -> None:
        """Each cell takes its sensor's reading; a NaN sensor gives way to the mean of the
        valid ones, and with none valid every cell keeps its last temperature."""
        valid = ~np.isnan(sensor_temp_c)
        if not valid.any():
            return
        per_cell = sensor_temp_c[self.sensor_of_cell]
        self.temp_c = np.where(np.isnan(per_cell), sensor_temp_c[valid].mean(), per_cell)

    def _track_rest(self, cell_current_a: float, dt_s: float) -> None:
        at_rest = abs(cell_current_a) <= self.rest_current_a / self.n_parallel
        if not at_rest:  # also for NaN
            self.rest_elapsed_s = 0.0
            self.rest_reinitialised = False
        else:
            self.rest_elapsed_s += dt_s

    def _initialise_from_ocv(self, cell_current_a: float, cell_voltage_v: np.ndarray) -> np.ndarray:
        """Cells seen for the first time start from the SOC of their voltage less the R0 drop
        of whatever current flows; once per long rest every cell restarts from its voltage
        less the polarisation the model says is still left. Returns the mask of cells
        (re)started."""
        if math.isnan(cell_current_a):
            return np.zeros(self.x.shape[0], dtype=bool)
        rest_done = self.rest_elapsed_s >= self.rest_time_s and not self.rest_reinitialised
        start = ~np.isnan(cell_voltage_v) & (rest_done | ~self.known)
        if rest_done:
            self.rest_reinitialised = True
        z = np.empty(5)
        std = self.cell.tuning.initial_soc_std
        for c in np.flatnonzero(start):
            ecm.impedance(self.cell.tables, 0.5, self.temp_c[c], z)
            ocv_v = cell_voltage_v[c] - z[ecm.R0] * cell_current_a
            if self.known[c]:
                ocv_v -= self.x[c, 1] + self.x[c, 2]
            self.x[c] = (ecm.soc_from_ocv(self.cell.tables, ocv_v, self.temp_c[c]), 0.0, 0.0)
            self.p[c] = np.diag([std**2, INITIAL_RC_STD_V**2, INITIAL_RC_STD_V**2])
        self.known |= start
        return start


def warm_up(cell: CellParams) -> None:
    """Compile (or load from the cache) every kernel the loop calls, before the first cycle."""
    estimator = PackEstimator(cell, 1, 1, rest_current_a=0.0, rest_time_s=1.0)
    voltage_v = cell.ocv_at(np.array([0.5]))
    for _ in range(2):
        estimator.step(0.0, voltage_v, np.array([DEFAULT_TEMP_C]), 0.1)
