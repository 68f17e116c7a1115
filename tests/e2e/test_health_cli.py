"""`bms health` as a user runs it, on held-out physics check-ups (tests/data/soh, truth from
PyBaMM)."""

from __future__ import annotations

import json
import subprocess

import pytest

from bms.csvio import read_columns, write_columns
from tests.conftest import BMS, REPO

pytestmark = pytest.mark.e2e
HEALTH = [str(BMS), "health"]
PARAMS = REPO / "models" / "soh" / "okane2022_spm"
SAMPLES = REPO / "tests" / "data" / "soh"
TRUTH = json.loads((SAMPLES / "truth.json").read_text())["files"]
COLUMNS = ("time_s", "current_a", "voltage_v", "temp_c")
DIGITS = {"time_s": 1, "current_a": 3, "voltage_v": 3, "temp_c": 2}


def health(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HEALTH, "--params", str(PARAMS), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.parametrize("name", sorted(TRUTH))
def test_json_estimates_against_the_physics_truth(name):
    truth = TRUTH[name]
    proc = health("--input", str(SAMPLES / name), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in (
        "soh_ml",
        "soh_online",
        "capacity_ml_ah",
        "capacity_online_ah",
        "resistance_growth",
    ):
        assert isinstance(out[key], float), key
    assert out["ml_available"] and out["ml_runtime"] == "ai_edge_litert"
    nominal = out["nominal_capacity_ah"]
    assert out["capacity_ml_ah"] == pytest.approx(out["soh_ml"] * nominal)
    assert out["capacity_online_ah"] == pytest.approx(out["soh_online"] * nominal)
    assert abs(out["soh_ml"] - truth["soh_true"]) <= 0.02
    assert abs(out["soh_online"] - truth["soh_true"]) <= 0.02
    assert abs(out["resistance_growth"] - truth["resistance_growth_true"]) <= 0.1
    assert out["warnings"] == []


def test_text_output_names_both_estimates():
    name = sorted(TRUTH)[-1]
    proc = health("--input", str(SAMPLES / name))
    assert proc.returncode == 0, proc.stderr
    assert "capacity, ML (int8 TFLite, ai_edge_litert):" in proc.stdout
    assert "capacity, online (" in proc.stdout
    assert "resistance growth, online (" in proc.stdout
    assert "SOH" in proc.stdout and "±" in proc.stdout


def test_a_log_without_a_charge_exits_2_and_says_what_is_missing(tmp_path):
    log = read_columns(SAMPLES / sorted(TRUTH)[0], COLUMNS)
    keep = log["current_a"] <= 0.0  # the discharges and rests only
    path = tmp_path / "no_charge.csv"
    write_columns(path, {k: v[keep] for k, v in log.items()}, DIGITS)
    proc = health("--input", str(path), "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "no usable charge segment" in proc.stderr
    assert "constant-current charge of at least 0.2C" in proc.stderr


def test_a_charge_cut_short_exits_2_naming_the_cv_phase(tmp_path):
    log = read_columns(SAMPLES / sorted(TRUTH)[0], COLUMNS)
    cut = log["voltage_v"] < 4.15
    charging = log["current_a"] > 0.0
    keep = ~charging | cut  # the charge stops below 4.15 V: no CV phase
    path = tmp_path / "short_charge.csv"
    write_columns(path, {k: v[keep] for k, v in log.items()}, DIGITS)
    proc = health("--input", str(path))
    assert proc.returncode == 2
    assert "never reached 4.20 V" in proc.stderr


def test_a_model_that_cannot_be_used_leaves_the_online_estimate(tmp_path):
    name = sorted(TRUTH)[-1]
    proc = health("--input", str(SAMPLES / name), "--json", "--model", str(tmp_path / "x.tflite"))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["soh_ml"] is None and not out["ml_available"]
    assert "cannot read" in out["ml_reason"]
    assert isinstance(out["soh_online"], float)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("time_s,current_a,voltage_v\n0,0,3.7\n1,0,3.7\n", "missing column(s) temp_c"),
        (None, "cannot read"),
    ],
)
def test_unusable_input_exits_2(tmp_path, content, message):
    path = tmp_path / "log.csv"
    if content is not None:
        path.write_text(content)
    proc = health("--input", str(path))
    assert proc.returncode == 2
    assert message in proc.stderr
