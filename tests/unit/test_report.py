"""Status records: JSON contract, NaN as null, extremes with cell numbers from 1."""

from __future__ import annotations

import json
import math

import numpy as np

from bms.report import status_record, to_json, to_line
from bms.types import ContactorState, Measurement, PackStatus
from tests.fakes import estimate_of


def status(cell_voltage_v, soc, temps=(25.0, 27.5)) -> PackStatus:
    return PackStatus(
        t_s=12.3456,
        contactors=ContactorState.CLOSED,
        estimate=estimate_of(soc),
        measurement=Measurement(12.3, np.array(cell_voltage_v), np.array(temps), -4.0, 11.0, 10.9),
        active_faults=("overtemperature",),
        latched_faults=(),
        charge_limit_a=0.0,
        discharge_limit_a=0.0,
    )


def test_record_reports_extremes_with_cell_numbers_counting_from_one():
    record = status_record(
        status([3.7, 3.6, math.nan], [0.5, 0.4, math.nan]), 10.0, 0.001, 0.002, 3
    )
    assert record["cell_voltage_min_v"] == 3.6 and record["cell_voltage_min_cell"] == 2
    assert record["cell_voltage_max_v"] == 3.7 and record["cell_voltage_max_cell"] == 1
    assert (record["soc_min"], record["soc_max"]) == (0.4, 0.5)
    assert record["temp_max_c"] == 27.5 and record["contactors"] == "closed"
    assert record["faults"] == ["overtemperature"] and record["missed_cycles"] == 3
    assert record["t_s"] == 2.346


def test_record_carries_the_estimates_uncertainty_and_the_weakest_cells_power():
    s = status([3.7, 3.6, 3.65], [0.5, 0.4, 0.45])
    s.estimate.soc_std[1] = 0.03
    s.estimate.discharge_limit_a[2, 1] = 42.0  # the 10 s column
    s.estimate.charge_limit_a[0, 0] = 1.0  # the 2 s column: not reported
    record = status_record(s, 0.0, 0.0, 0.0, 0)
    assert record["soc_std_max"] == 0.03
    assert (record["power_charge_10s_a"], record["power_discharge_10s_a"]) == (100.0, 42.0)
    assert "% ±3.0 |" in to_line(record)


def test_json_turns_nan_into_null_and_the_line_into_dashes():
    record = status_record(status([math.nan] * 3, [math.nan] * 3, (math.nan,)), 0.0, 0.0, 0.0, 0)
    decoded = json.loads(to_json(record))
    assert decoded["cell_voltage_min_v"] is None and decoded["cell_voltage_min_cell"] is None
    assert decoded["soc_mean"] is None and decoded["temp_max_c"] is None
    line = to_line(record)
    assert "SOC --/--/--%" in line and "V -- (c-)..-- (c-)" in line
