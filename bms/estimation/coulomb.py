"""SOC by coulomb counting with OCV (re-)initialisation after rest.

This is the honest baseline the EKF of the estimation issue replaces: it integrates the pack
current with the nominal capacity (so per-cell capacity differences and sensor offsets make it
drift) and snaps each cell to the SOC of its open-circuit voltage once the pack has rested.
"""

from __future__ import annotations

import numpy as np

from bms.estimation.cell_params import CellParams

SECONDS_PER_HOUR = 3600.0


class CoulombCounter:
    """Per-cell SOC (fractions in [0, 1], shape (n_cells,)); NaN until a valid voltage is seen."""

    def __init__(
        self,
        cell: CellParams,
        n_cells: int,
        rest_current_a: float,
        rest_time_s: float,
        n_parallel: int = 1,
    ):
        """``n_cells`` series groups of ``n_parallel`` cells: the pack current divides among
        the cells of a group, so a group's capacity is ``n_parallel`` cells'."""
        self.cell = cell
        self.group_capacity_ah = cell.capacity_ah * n_parallel
        self.rest_current_a = rest_current_a
        self.rest_time_s = rest_time_s
        self.soc = np.full(n_cells, np.nan)
        self.rest_elapsed_s = 0.0

    def step(self, current_a: float, cell_voltage_v: np.ndarray, dt_s: float) -> np.ndarray:
        """Advance by ``dt_s`` seconds of ``current_a`` (positive = charging).

        Cells without an estimate start from their OCV (the service assumes a rested pack at
        boot); after ``rest_time_s`` below ``rest_current_a`` every valid cell is re-initialised
        from its voltage. A NaN current leaves the SOC untouched and resets the rest timer.
        """
        if np.isnan(current_a):
            self.rest_elapsed_s = 0.0
            return self.soc
        self.soc += current_a * dt_s / (SECONDS_PER_HOUR * self.group_capacity_ah)
        np.clip(self.soc, 0.0, 1.0, out=self.soc)

        at_rest = abs(current_a) <= self.rest_current_a
        self.rest_elapsed_s = self.rest_elapsed_s + dt_s if at_rest else 0.0
        valid = ~np.isnan(cell_voltage_v)
        if self.rest_elapsed_s >= self.rest_time_s:
            reinit = valid
        else:
            reinit = valid & np.isnan(self.soc)
        if reinit.any():
            self.soc[reinit] = self.cell.soc_at_ocv(cell_voltage_v[reinit])
        return self.soc
