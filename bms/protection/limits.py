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
from typing import Annotated

from pydantic import Field, model_validator

from bms.schema import StrictModel

GRADES = ("mol", "rsl", "msl")


@dataclass(frozen=True, slots=True)
class GradedQuantity:
    """How a quantity of the limit set reads as a fault id and for a person, and where a
    limit of a real cell can lie at all (outside is a typo: a unit mix-up, say)."""

    fault_prefix: str  # fault ids are f"{fault_prefix}_{grade}"
    label: str
    plausible_min: float
    plausible_max: float
    field: str = ""  # the LimitSet field, with its unit; filled in from the model below


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


_TEMP_C = (-40.0, 120.0)
_CURRENT_A = (0.001, 10000.0)
_CELL_V = (0.5, 6.0)


class LimitSet(StrictModel):
    """The graded limits of one cell chemistry; each quantity is declared once, here."""

    name: str = Field(min_length=1)
    description: str = ""
    cell_voltage_high_v: Annotated[
        UpperGrades, GradedQuantity("cell_voltage_high", "highest cell voltage", *_CELL_V)
    ]
    cell_voltage_low_v: Annotated[
        LowerGrades, GradedQuantity("cell_voltage_low", "lowest cell voltage", *_CELL_V)
    ]
    temp_high_charge_c: Annotated[
        UpperGrades,
        GradedQuantity("temp_high_charge", "highest temperature while charging", *_TEMP_C),
    ]
    temp_low_charge_c: Annotated[
        LowerGrades,
        GradedQuantity("temp_low_charge", "lowest temperature while charging", *_TEMP_C),
    ]
    temp_high_discharge_c: Annotated[
        UpperGrades,
        GradedQuantity(
            "temp_high_discharge", "highest temperature while discharging or at rest", *_TEMP_C
        ),
    ]
    temp_low_discharge_c: Annotated[
        LowerGrades,
        GradedQuantity(
            "temp_low_discharge", "lowest temperature while discharging or at rest", *_TEMP_C
        ),
    ]
    charge_current_a: Annotated[
        UpperGrades, GradedQuantity("charge_current", "charge current per cell", *_CURRENT_A)
    ]
    discharge_current_a: Annotated[
        UpperGrades,
        GradedQuantity("discharge_current", "discharge current per cell", *_CURRENT_A),
    ]
    temp_spread_c: Annotated[
        UpperGrades, GradedQuantity("temp_spread", "temperature spread", 0.1, 100.0)
    ]
    cell_voltage_spread_v: Annotated[
        UpperGrades, GradedQuantity("cell_voltage_spread", "cell voltage spread", 0.001, 5.0)
    ]

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
        for quantity in GRADED_QUANTITIES:
            grades = getattr(self, quantity.field)
            for grade in GRADES:
                value = getattr(grades, grade)
                if not quantity.plausible_min <= value <= quantity.plausible_max:
                    problems.append(
                        f"{quantity.field}.{grade} = {value:g} is outside "
                        f"{quantity.plausible_min:g}..{quantity.plausible_max:g}"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _graded_quantities() -> tuple[GradedQuantity, ...]:
    quantities = []
    for name, field in LimitSet.model_fields.items():
        for meta in field.metadata:
            if isinstance(meta, GradedQuantity):
                quantities.append(
                    GradedQuantity(
                        meta.fault_prefix, meta.label, meta.plausible_min, meta.plausible_max, name
                    )
                )
    return tuple(quantities)


GRADED_QUANTITIES: tuple[GradedQuantity, ...] = _graded_quantities()
"""Every graded quantity of the limit set, in declaration order."""
