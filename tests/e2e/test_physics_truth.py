"""The estimator against a physics model it was not tuned on, through the CLI, in CI.

The fixtures (tests/data/truth, made by models/ecm/truth/generate.py with PyBaMM's DFN of an
LG M50) are an OCV test and a pulse test at 25 degC, the first 15 minutes of a US06 drive
cycle that neither fit saw, 25 minutes of a WLTC cycle at 0 degC, and the first three levels
(SOC 0.99, 0.965, 0.925) of the power test at 25 degC. The full-size measurement is
benchmarks/accuracy_estimation.py.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from bms.csvio import read_columns
from bms.estimation.cell_params import load_cell_params
from bms.estimation.estimator import PackEstimator
from tests.conftest import REPO, run_bms, run_identify

pytestmark = pytest.mark.e2e
TRUTH = REPO / "tests" / "data" / "truth"
CAPACITY_AH = 5.1532
"""PyBaMM's equilibrium capacity between 2.5 and 4.2 V (its ElectrodeSOH solver)."""


@pytest.fixture(scope="module")
def identified(tmp_path_factory):
    out = tmp_path_factory.mktemp("lgm50") / "set"
    proc = run_identify(out, TRUTH / "ocv_25C_5min.csv", [TRUTH / "hppc_25C.csv"])
    assert proc.returncode == 0, proc.stderr
    return out


def test_identification_finds_the_physics_models_capacity(identified):
    cell = load_cell_params(identified)
    assert cell.capacity_ah == pytest.approx(CAPACITY_AH, rel=0.005)
    assert (cell.voltage_min_v, cell.voltage_max_v) == (2.5, 4.2)
    assert cell.tables.imp_soc.size >= 8  # a pulse pair at every SOC step but the top


def replay_error(identified, tmp_path, *extra) -> tuple[float, float]:
    proc = run_bms(
        "replay", "--params", str(identified),
        "--input", str(TRUTH / "us06_25C_first900s.csv"),
        "--out", str(tmp_path / "est.csv"), *extra,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rmse, max_abs = re.search(r"RMSE ([\d.]+) %, max ([\d.]+) %", proc.stdout).groups()
    return float(rmse), float(max_abs)


def test_soc_on_a_held_out_drive_cycle(identified, tmp_path):
    rmse, max_abs = replay_error(identified, tmp_path)
    assert rmse < 2.5 and max_abs < 3.0  # measured 1.50 / 1.61 (near full, where it is worst)


def test_soc_recovers_from_a_start_30_percent_off(identified, tmp_path):
    _, max_abs = replay_error(identified, tmp_path, "--initial-soc", "0.65")
    assert max_abs < 3.0  # after 300 s; measured 2.07


def test_a_start_30_percent_off_in_the_cold_is_corrected_within_10_minutes(tmp_path):
    """Half an hour into a WLTC cycle at 0 degC, under load, started 30 % below the truth
    with the set identified from the full-size tests (models/ecm/lgm50_pybamm): the error is
    below 3 % from 600 s on. Measured on this window (the accuracy benchmark starts its
    30 % off here too, and gets the same): 2.13 %, below 3 % from 273 s; with the
    polarisation's error a random walk of 0.5 mV/sqrt(s), as at e92b4db, it held a wrong
    SOC: 4.29 %."""
    log = TRUTH / "wltc_0C_30to55min.csv"
    soc_true = read_columns(log, ("time_s", "soc_true"))
    start = float(soc_true["soc_true"][0]) - 0.3
    proc = run_bms(
        "replay", "--params", str(REPO / "models" / "ecm" / "lgm50_pybamm"),
        "--input", str(log), "--out", str(tmp_path / "est.csv"), "--initial-soc", f"{start:.4f}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    estimate = read_columns(tmp_path / "est.csv", ("time_s", "soc"))
    assert np.array_equal(estimate["time_s"], soc_true["time_s"])
    late = estimate["time_s"] - estimate["time_s"][0] >= 600.0
    assert np.abs(estimate["soc"] - soc_true["soc_true"])[late].max() < 0.03


SOP_TRUTH_25C = {
    # soc: (10 s discharge, 30 s discharge, 10 s charge), A, from rest: sop_truth.csv
    # (generate.py's bisection against the DFN to 0.2 %), at SOC points the test never ran
    0.95: (64.448, 34.092, 1.753),
    0.98: (64.711, 34.510, 0.676),
}


def test_state_of_power_from_a_power_test_near_full(tmp_path):
    """Identified with the power test's first three levels, the limits from rest at SOC 0.95
    and 0.98 (between its levels) against PyBaMM's own largest currents: the 10 s discharge
    limit within 15 % and not above (the issue's target), the others not above."""
    out = tmp_path / "set"
    proc = run_identify(
        out,
        TRUTH / "ocv_25C_5min.csv",
        [TRUTH / "hppc_25C.csv"],
        [TRUTH / "power_25C_3levels.csv"],
    )
    assert proc.returncode == 0, proc.stderr
    assert "power map over 3 SOC points x 1 temperatures x 13 currents" in proc.stdout
    cell = load_cell_params(out)
    for soc, (discharge_10s_a, discharge_30s_a, charge_10s_a) in SOP_TRUTH_25C.items():
        estimator = PackEstimator(cell, 1, 1, 0.0, math.inf)
        estimator.set_soc(soc)
        estimate = estimator.step(0.0, np.array([math.nan]), np.array([25.0]), 0.0)
        discharge_a, charge_a = estimate.discharge_limit_a[0], estimate.charge_limit_a[0]
        assert 0.85 * discharge_10s_a <= discharge_a[1] <= discharge_10s_a  # measured 0.99
        assert discharge_a[2] <= discharge_30s_a  # measured 0.99
        assert charge_a[1] <= charge_10s_a  # measured 0.91 and 0.60
