"""Cell parameter sets and the coulomb-counting SOC baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bms.estimation.cell_params import CellParamsError, load_cell_params
from bms.estimation.coulomb import CoulombCounter
from tests.conftest import REPO

CELL = load_cell_params(REPO / "models" / "ecm" / "generic_nmc")


def test_ocv_and_its_inverse_agree_and_clamp():
    soc = np.linspace(0, 1, 41)
    assert CELL.soc_at_ocv(CELL.ocv_at(soc)) == pytest.approx(soc, abs=1e-9)
    assert CELL.ocv_at(np.array([-0.5, 1.5])).tolist() == [CELL.ocv_v[0], CELL.ocv_v[-1]]
    assert CELL.soc_at_ocv(np.array([1.0, 9.0])).tolist() == [0.0, 1.0]


def test_broken_parameter_sets_are_named(tmp_path):
    (tmp_path / "params.toml").write_text(
        'name = "x"\ncapacity_ah = 5.0\nvoltage_max_v = 4.2\nvoltage_min_v = 2.5\n'
        "soc = [0.0, 1.0]\nocv_v = [4.2, 3.0]\nr0_ohm = 0.01\nr1_ohm = 0.01\nc1_f = 1.0\n"
        "r2_ohm = 0.01\nc2_f = 1.0\n"
    )
    with pytest.raises(CellParamsError, match="ocv_v must rise strictly"):
        load_cell_params(tmp_path)
    with pytest.raises(CellParamsError, match="cannot read"):
        load_cell_params(tmp_path / "absent")


def counter(n_cells=2, rest_time_s=10.0):
    return CoulombCounter(CELL, n_cells, rest_current_a=0.5, rest_time_s=rest_time_s)


def test_starts_from_ocv_of_the_first_valid_voltage():
    soc_true = np.array([0.3, 0.7])
    estimator = counter()
    soc = estimator.step(0.0, CELL.ocv_at(soc_true), 0.1)
    assert soc == pytest.approx(soc_true, abs=1e-9)


def test_integrates_current_with_the_sign_convention():
    estimator = counter(n_cells=1)
    estimator.step(0.0, CELL.ocv_at(np.array([0.5])), 0.1)
    for _ in range(360):  # 10 A discharge for 360 s = 1 Ah of a 5 Ah cell
        soc = estimator.step(-10.0, np.array([3.5]), 1.0)
    assert soc[0] == pytest.approx(0.5 - 0.2, abs=1e-9)
    for _ in range(180):  # 20 A charge for 180 s = +1 Ah
        soc = estimator.step(20.0, np.array([3.5]), 1.0)
    assert soc[0] == pytest.approx(0.5, abs=1e-9)


def test_nan_voltage_waits_for_a_valid_one():
    estimator = counter(n_cells=2)
    soc = estimator.step(0.0, np.array([math.nan, CELL.ocv_at(0.4)]), 0.1)
    assert math.isnan(soc[0]) and soc[1] == pytest.approx(0.4)
    soc = estimator.step(0.0, np.array([CELL.ocv_at(0.6), CELL.ocv_at(0.4)]), 0.1)
    assert soc == pytest.approx([0.6, 0.4])


def test_rest_re_initialises_from_ocv_only_after_rest_time():
    estimator = counter(n_cells=1, rest_time_s=10.0)
    estimator.step(0.0, CELL.ocv_at(np.array([0.5])), 0.1)
    estimator.step(-36.0, np.array([3.5]), 100.0)  # 1 Ah out, the counter says 0.3
    rested_v = CELL.ocv_at(np.array([0.32]))  # the cell says 0.32 (the counter drifted)
    soc = estimator.step(0.0, rested_v, 5.0)
    assert soc[0] == pytest.approx(0.3, abs=1e-9)
    soc = estimator.step(0.0, rested_v, 5.0)
    assert soc[0] == pytest.approx(0.32, abs=1e-9)


def test_nan_current_holds_soc_and_resets_rest():
    estimator = counter(n_cells=1, rest_time_s=10.0)
    estimator.step(0.0, CELL.ocv_at(np.array([0.5])), 9.0)
    soc = estimator.step(math.nan, CELL.ocv_at(np.array([0.9])), 5.0)
    assert soc[0] == pytest.approx(0.5)
    assert estimator.rest_elapsed_s == 0.0


def test_parallel_cells_share_the_pack_current():
    estimator = CoulombCounter(CELL, 1, rest_current_a=0.5, rest_time_s=10.0, n_parallel=2)
    estimator.step(0.0, CELL.ocv_at(np.array([0.5])), 0.1)
    soc = estimator.step(-10.0, np.array([3.5]), 360.0)  # 1 Ah out of two 5 Ah cells
    assert soc[0] == pytest.approx(0.5 - 0.1, abs=1e-9)
