"""Passive balancing: which cells bleed charge through their resistors now.

From the SOC estimate, each cell's charge to remove (Ah) is what makes all cells reach the
target together: for top balancing, the cells closer to full give up the difference in
charge-to-full; for bottom balancing, the cells further from empty give up the difference in
charge-above-empty. A cell bleeds once its excess passes ``start_delta_ah`` and stops below
``stop_delta_ah``. When the estimate cannot be trusted (a NaN in it, or a cell whose SOC sigma
is above ``trusted_soc_std``), the cell voltages decide instead (``voltage_start_delta_v`` above
the lowest cell), which is only meaningful near rest.
Balancing runs only when allowed: at rest or while charging, every cell above
``min_cell_voltage_v``, every temperature below ``max_temp_c``, and no fault that forbids a
close; the resistors' heat is bounded by a duty cycle (on for ``max_duty`` of each
``duty_period_s``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from bms.schema import StrictModel


class BalancingConfig(StrictModel):
    """The ``[balancing]`` section."""

    enabled: bool = True
    target: Literal["top", "bottom"] = "top"
    start_delta_ah: float = Field(0.01, gt=0.0, le=100.0)
    stop_delta_ah: float = Field(0.005, ge=0.0, le=100.0)
    voltage_start_delta_v: float = Field(0.010, gt=0.0, le=1.0)
    min_cell_voltage_v: float = Field(3.6, gt=0.0, le=6.0)
    max_temp_c: float = Field(45.0, ge=-40.0, le=120.0)
    max_duty: float = Field(0.5, gt=0.0, le=1.0)
    duty_period_s: float = Field(10.0, gt=0.0, le=3600.0)
    trusted_soc_std: float = Field(
        0.03, gt=0.0, le=1.0, description="above this SOC sigma the voltages decide instead"
    )
    bleed_resistance_ohm: float | None = Field(
        None,
        gt=0.0,
        le=1e6,
        description=(
            "each cell's balancing path (resistor plus switch), ohm: the estimator takes V / R "
            "out of a bleeding cell, which the pack current does not show; unset, it sees the "
            "bleed only in the voltage, late, and balancing overshoots"
        ),
    )

    @model_validator(mode="after")
    def _hysteresis(self) -> BalancingConfig:
        if self.stop_delta_ah >= self.start_delta_ah:
            raise ValueError("stop_delta_ah must be below start_delta_ah")
        return self


def charge_to_remove_ah(
    soc: np.ndarray, capacity_ah: float | np.ndarray, target: str
) -> np.ndarray:
    """Per cell, the charge (Ah) to bleed so all cells reach the target together. With equal
    capacities top and bottom agree; they differ once per-cell capacities are known."""
    if target == "top":
        to_full_ah = (1.0 - soc) * capacity_ah
        return to_full_ah.max() - to_full_ah
    above_empty_ah = soc * capacity_ah
    return above_empty_ah - above_empty_ah.min()


def bleed_current_a(
    bleeding: np.ndarray, cell_voltage_v: np.ndarray, resistance_ohm: float | None
) -> np.ndarray | None:
    """What each cell's balancing resistor draws (n_cells, A, positive out of the cell) while
    the cells in ``bleeding`` bleed, for the estimator: None while none bleeds or the
    resistance is not configured. A NaN voltage counts as 0 A (such a cell is never bled:
    balancing needs every cell valid)."""
    if resistance_ohm is None or not bleeding.any():
        return None
    return np.where(bleeding, np.nan_to_num(cell_voltage_v), 0.0) / resistance_ohm


class Balancer:
    """Keeps the set of bleeding cells between cycles (for the hysteresis)."""

    def __init__(self, config: BalancingConfig, n_cells: int, capacity_ah: float):
        self.config = config
        self.capacity_ah = capacity_ah
        self.selected = np.zeros(n_cells, dtype=bool)

    def allowed(
        self,
        cell_voltage_v: np.ndarray,
        cell_temp_c: np.ndarray,
        current_a: float,
        rest_current_a: float,
        faults_forbid: bool,
    ) -> bool:
        """Whether any cell may bleed now (NaN anywhere: no)."""
        c = self.config
        charging_or_rest = current_a > -rest_current_a  # False for NaN
        return bool(
            c.enabled
            and not faults_forbid
            and charging_or_rest
            and np.all(cell_voltage_v > c.min_cell_voltage_v)
            and np.all(cell_temp_c < c.max_temp_c)
        )

    def update(
        self,
        t_s: float,
        soc: np.ndarray,
        cell_voltage_v: np.ndarray,
        allowed: bool,
        *,
        soc_std: np.ndarray | float,
    ) -> np.ndarray:
        """Return the mask (n_cells,) of cells to bleed this cycle; ``soc`` and ``soc_std``
        are the estimate's (n_cells,)."""
        c = self.config
        if not allowed:
            self.selected[:] = False
            return self.selected.copy()
        if np.all(soc_std <= c.trusted_soc_std) and not np.isnan(soc).any():
            excess_ah = charge_to_remove_ah(soc, self.capacity_ah, c.target)
            start, stop = excess_ah > c.start_delta_ah, excess_ah < c.stop_delta_ah
        else:  # the voltage says the same for both targets while capacities are equal
            above_v = cell_voltage_v - cell_voltage_v.min()
            start = above_v > c.voltage_start_delta_v
            stop = above_v < c.voltage_start_delta_v / 2
        self.selected = (self.selected | start) & ~stop
        duty_on = (t_s % c.duty_period_s) < c.max_duty * c.duty_period_s
        return self.selected & duty_on
