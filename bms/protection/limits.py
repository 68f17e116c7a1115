"""Graded limit sets: per cell chemistry, three levels per quantity (foxBMS
``battery_cell_cfg.h``).

- MOL, maximum operating limit: warn and derate;
- RSL, recommended safety limit: no new close, derate to zero;
- MSL, maximum safety limit: open the contactors after the row's delay.

A limit set is a TOML file in ``config/limits/``. Each quantity has its unit in its name; an
upper quantity must rise MOL < RSL < MSL, a lower one must fall MOL > RSL > MSL. Currents are
per cell (a pack with parallel cells multiplies them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator

from bms.schema import SchemaError, StrictModel, load_model

GRADES = ("mol", "rsl", "msl")

PLAUSIBLE_RANGES = (
    ("cell_voltage_high_v", 0.5, 6.0),
    ("cell_voltage_low_v", 0.5, 6.0),
    ("temp_high_charge_c", -40.0, 120.0),
    ("temp_low_charge_c", -40.0, 120.0),
    ("temp_high_discharge_c", -40.0, 120.0),
    ("temp_low_discharge_c", -40.0, 120.0),
    ("charge_current_a", 0.001, 10000.0),
    ("discharge_current_a", 0.001, 10000.0),
    ("temp_spread_c", 0.1, 100.0),
    ("cell_voltage_spread_v", 0.001, 5.0),
)
"""Where a limit of a real cell can lie at all; outside is a typo (a unit mix-up, say)."""


class UpperGrades(StrictModel):
    """A limit that must not be exceeded: MOL < RSL < MSL."""

    mol: float
    rsl: float
    msl: float

    @model_validator(mode="after")
    def _rising(self) -> UpperGrades:
        if not self.mol < self.rsl < self.msl:
            raise ValueError(f"must rise mol < rsl < msl (got {self.mol}, {self.rsl}, {self.msl})")
        return self


class LowerGrades(StrictModel):
    """A limit that must not be undercut: MOL > RSL > MSL."""

    mol: float
    rsl: float
    msl: float

    @model_validator(mode="after")
    def _falling(self) -> LowerGrades:
        if not self.mol > self.rsl > self.msl:
            raise ValueError(f"must fall mol > rsl > msl (got {self.mol}, {self.rsl}, {self.msl})")
        return self


class LimitSet(StrictModel):
    """The graded limits of one cell chemistry."""

    name: str = Field(min_length=1)
    description: str = ""
    cell_voltage_high_v: UpperGrades
    cell_voltage_low_v: LowerGrades
    temp_high_charge_c: UpperGrades
    temp_low_charge_c: LowerGrades
    temp_high_discharge_c: UpperGrades
    temp_low_discharge_c: LowerGrades
    charge_current_a: UpperGrades
    discharge_current_a: UpperGrades
    temp_spread_c: UpperGrades
    cell_voltage_spread_v: UpperGrades

    @model_validator(mode="after")
    def _consistent(self) -> LimitSet:
        problems = []
        if self.cell_voltage_low_v.mol >= self.cell_voltage_high_v.mol:
            problems.append("cell_voltage_low_v.mol must be below cell_voltage_high_v.mol")
        for mode in ("charge", "discharge"):
            low = getattr(self, f"temp_low_{mode}_c")
            high = getattr(self, f"temp_high_{mode}_c")
            if low.mol >= high.mol:
                problems.append(f"temp_low_{mode}_c.mol must be below temp_high_{mode}_c.mol")
        for name, low, high in PLAUSIBLE_RANGES:
            grades = getattr(self, name)
            for grade in GRADES:
                value = getattr(grades, grade)
                if not low <= value <= high:
                    problems.append(f"{name}.{grade} = {value:g} is outside {low:g}..{high:g}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class LimitSetError(SchemaError):
    """A limit set that cannot be read or is inconsistent."""


def load_limit_set(path: Path) -> LimitSet:
    try:
        return load_model(path, LimitSet)
    except SchemaError as exc:
        raise LimitSetError(exc.problems) from None


@dataclass(frozen=True, slots=True)
class GradedQuantity:
    """A quantity of the limit set and how it reads as a fault id and for a person."""

    field: str  # name in LimitSet, with its unit
    fault_prefix: str  # fault ids are f"{fault_prefix}_{grade}"
    label: str


GRADED_QUANTITIES: tuple[GradedQuantity, ...] = (
    GradedQuantity("cell_voltage_high_v", "cell_voltage_high", "highest cell voltage"),
    GradedQuantity("cell_voltage_low_v", "cell_voltage_low", "lowest cell voltage"),
    GradedQuantity("temp_high_charge_c", "temp_high_charge", "highest temperature while charging"),
    GradedQuantity("temp_low_charge_c", "temp_low_charge", "lowest temperature while charging"),
    GradedQuantity(
        "temp_high_discharge_c",
        "temp_high_discharge",
        "highest temperature while discharging or at rest",
    ),
    GradedQuantity(
        "temp_low_discharge_c",
        "temp_low_discharge",
        "lowest temperature while discharging or at rest",
    ),
    GradedQuantity("charge_current_a", "charge_current", "charge current per cell"),
    GradedQuantity("discharge_current_a", "discharge_current", "discharge current per cell"),
    GradedQuantity("temp_spread_c", "temp_spread", "temperature spread"),
    GradedQuantity("cell_voltage_spread_v", "cell_voltage_spread", "cell voltage spread"),
)
