"""Derating: the charge and discharge currents the pack may carry now.

Each limit starts from the pack's operating maximum (the MOL of the current, times the cells in
parallel) and is scaled by the smallest of several factors in [0, 1], each falling linearly
from 1 at a quantity's MOL to 0 at its RSL: temperature (the charge or discharge limits), cell
voltage headroom (highest cell for charge, lowest for discharge), the spread of temperatures and
of cell voltages (both directions), and SOC near full or empty. So every row whose action is
to derate (each quantity's MOL) has its taper here.
It is then capped by the estimator's state of power: the current the weakest cell can carry
for ``power_duration_s`` without leaving its voltage limits.
A missing input (NaN) gives a factor of 0: when in doubt, no current. The published limit falls
at once and rises at most ``ramp_up_a_per_s``, so a load that follows it never trips on a step.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from bms.protection.limits import LimitSet, LowerGrades, UpperGrades
from bms.schema import StrictModel
from bms.types import Estimate


class DeratingConfig(StrictModel):
    """The ``[derating]`` section."""

    soc_charge_taper_start: float = Field(
        0.95, gt=0.0, lt=1.0, description="the charge limit falls from here to 0 at SOC 1"
    )
    soc_discharge_taper_start: float = Field(
        0.05, gt=0.0, lt=1.0, description="the discharge limit falls from here to 0 at SOC 0"
    )
    ramp_up_a_per_s: float = Field(10.0, gt=0.0, le=100000.0)
    power_duration_s: Literal[2.0, 10.0, 30.0] = Field(
        10.0, description="state of power for pulses this long caps the limits"
    )

    @model_validator(mode="after")
    def _ordered(self) -> DeratingConfig:
        if self.soc_discharge_taper_start >= self.soc_charge_taper_start:
            raise ValueError("soc_discharge_taper_start must be below soc_charge_taper_start")
        return self


def taper_upper(value: float, grades: UpperGrades) -> float:
    """1 at or below MOL, 0 at or above RSL, linear between; 0 for NaN."""
    if math.isnan(value):
        return 0.0
    return float(np.clip((grades.rsl - value) / (grades.rsl - grades.mol), 0.0, 1.0))


def taper_lower(value: float, grades: LowerGrades) -> float:
    """1 at or above MOL, 0 at or below RSL, linear between; 0 for NaN."""
    if math.isnan(value):
        return 0.0
    return float(np.clip((value - grades.rsl) / (grades.mol - grades.rsl), 0.0, 1.0))


def _capped(limit_a: float, power_a: float) -> float:
    """The smaller of the two; 0 where the state of power is unknown (NaN)."""
    return 0.0 if math.isnan(power_a) else min(limit_a, power_a)


def _taper_soc(soc: float, start: float, end: float) -> float:
    """1 before ``start``, 0 at ``end`` (either direction), linear between; 0 for NaN."""
    if math.isnan(soc):
        return 0.0
    return float(np.clip((end - soc) / (end - start), 0.0, 1.0))


def _highest(values: np.ndarray) -> float:
    """NumPy's max is NaN when any value is: a missing cell may be the extreme one."""
    return float(np.max(values))


def _lowest(values: np.ndarray) -> float:
    return float(np.min(values))


def spread_factors(
    cell_voltage_v: np.ndarray, cell_temp_c: np.ndarray, limits: LimitSet
) -> dict[str, float]:
    """A wide spread of temperatures or cell voltages (a weak or hot cell) limits both
    directions; these are the tapers of the spread rows' MOL (derate) and RSL."""
    return {
        "temp_spread": taper_upper(
            _highest(cell_temp_c) - _lowest(cell_temp_c), limits.temp_spread_c
        ),
        "cell_voltage_spread": taper_upper(
            _highest(cell_voltage_v) - _lowest(cell_voltage_v), limits.cell_voltage_spread_v
        ),
    }


def charge_factors(
    cell_voltage_v: np.ndarray,
    cell_temp_c: np.ndarray,
    soc: np.ndarray,
    limits: LimitSet,
    config: DeratingConfig,
) -> dict[str, float]:
    """Every factor that limits charging, by name (for the record and the tests)."""
    return {
        "temp_high": taper_upper(_highest(cell_temp_c), limits.temp_high_charge_c),
        "temp_low": taper_lower(_lowest(cell_temp_c), limits.temp_low_charge_c),
        "cell_voltage": taper_upper(_highest(cell_voltage_v), limits.cell_voltage_high_v),
        "soc": _taper_soc(_highest(soc), config.soc_charge_taper_start, 1.0),
        **spread_factors(cell_voltage_v, cell_temp_c, limits),
    }


def discharge_factors(
    cell_voltage_v: np.ndarray,
    cell_temp_c: np.ndarray,
    soc: np.ndarray,
    limits: LimitSet,
    config: DeratingConfig,
) -> dict[str, float]:
    """Every factor that limits discharging, by name."""
    return {
        "temp_high": taper_upper(_highest(cell_temp_c), limits.temp_high_discharge_c),
        "temp_low": taper_lower(_lowest(cell_temp_c), limits.temp_low_discharge_c),
        "cell_voltage": taper_lower(_lowest(cell_voltage_v), limits.cell_voltage_low_v),
        "soc": _taper_soc(_lowest(soc), config.soc_discharge_taper_start, 0.0),
        **spread_factors(cell_voltage_v, cell_temp_c, limits),
    }


class CurrentLimiter:
    """Turns the factors into published limits (A, positive magnitudes) with the ramp."""

    def __init__(self, limits: LimitSet, config: DeratingConfig, n_parallel: int):
        self.limits = limits
        self.config = config
        self.charge_max_a = limits.charge_current_a.mol * n_parallel
        self.discharge_max_a = limits.discharge_current_a.mol * n_parallel
        self.charge_limit_a = 0.0
        self.discharge_limit_a = 0.0

    def update(
        self,
        cell_voltage_v: np.ndarray,
        cell_temp_c: np.ndarray,
        estimate: Estimate,
        allowed: bool,
        dt_s: float,
    ) -> tuple[float, float]:
        """Return (charge_limit_a, discharge_limit_a); zero unless ``allowed`` (contactors
        closed and no fault that derates to zero)."""
        if allowed:
            args = (cell_voltage_v, cell_temp_c, estimate.soc, self.limits, self.config)
            power_charge_a, power_discharge_a = estimate.pack_limits_a(self.config.power_duration_s)
            charge_a = _capped(
                self.charge_max_a * min(charge_factors(*args).values()), power_charge_a
            )
            discharge_a = _capped(
                self.discharge_max_a * min(discharge_factors(*args).values()),
                power_discharge_a,
            )
        else:
            charge_a = discharge_a = 0.0
        step_a = self.config.ramp_up_a_per_s * dt_s
        self.charge_limit_a = min(charge_a, self.charge_limit_a + step_a)
        self.discharge_limit_a = min(discharge_a, self.discharge_limit_a + step_a)
        return self.charge_limit_a, self.discharge_limit_a
