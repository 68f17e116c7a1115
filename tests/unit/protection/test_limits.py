"""Limit sets and derating settings refuse inconsistent values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bms.config import LimitSetError, load_limit_set
from bms.protection.derating import DeratingConfig
from bms.protection.limits import LowerGrades, UpperGrades
from tests.conftest import LIMITS


def test_the_shipped_limit_set_loads():
    limits = load_limit_set(LIMITS)
    assert limits.name == "nmc"
    assert limits.cell_voltage_high_v.msl == 4.25


def test_grades_must_be_ordered_away_from_the_safe_side():
    UpperGrades(mol=1.0, rsl=2.0, msl=3.0)
    LowerGrades(mol=3.0, rsl=2.0, msl=1.0)
    with pytest.raises(ValidationError, match="must rise mol < rsl < msl"):
        UpperGrades(mol=1.0, rsl=3.0, msl=2.0)
    with pytest.raises(ValidationError, match="must fall mol > rsl > msl"):
        LowerGrades(mol=1.0, rsl=2.0, msl=3.0)


def test_low_and_high_voltage_limits_must_not_cross(make_limits):
    path = make_limits({"cell_voltage_low_v": {"mol": 4.16, "rsl": 4.0, "msl": 3.9}})
    with pytest.raises(LimitSetError, match=r"cell_voltage_low_v\.mol must be below"):
        load_limit_set(path)


def test_derating_tapers_must_not_overlap():
    with pytest.raises(ValidationError, match="soc_discharge_taper_start must be below"):
        DeratingConfig(soc_charge_taper_start=0.4, soc_discharge_taper_start=0.5)
