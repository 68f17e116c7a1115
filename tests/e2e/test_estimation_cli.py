"""`bms identify` and `bms replay` as a user runs them: files in, files and figures out."""

from __future__ import annotations

import csv
import hashlib
import re
import tomllib

import numpy as np
import pytest

from bms.csvio import write_columns
from bms.estimation import ecm
from bms.estimation.cell_params import load_cell_params
from tests.conftest import REPO, run_bms, run_identify
from tests.unit.estimation.synthetic import hppc_test, ocv_test, power_test

pytestmark = pytest.mark.e2e
CELL = load_cell_params(REPO / "models" / "ecm" / "generic_nmc")
DIGITS = {"time_s": 1, "current_a": 4, "voltage_v": 5, "temp_c": 2, "soc_true": 6}


def write_test(path, data, current_sign=1.0):
    write_columns(
        path,
        {
            "time_s": data.time_s,
            "current_a": current_sign * data.current_a,
            "voltage_v": data.voltage_v,
            "temp_c": data.temp_c,
        },
        DIGITS,
    )
    return path


@pytest.fixture(scope="module")
def tests_dir(tmp_path_factory):
    """An OCV test at 25 degC and pulse tests at 0 and 40 degC of the generic cell."""
    d = tmp_path_factory.mktemp("characterisation")
    write_test(d / "ocv.csv", ocv_test(CELL))
    for temp_c in (0.0, 40.0):
        write_test(d / f"hppc_{temp_c:g}C.csv", hppc_test(CELL, temp_c, dt_s=2.0))
    return d


@pytest.fixture(scope="module")
def identified(tests_dir):
    out = tests_dir / "set"
    proc = run_identify(
        out, tests_dir / "ocv.csv", [tests_dir / "hppc_0C.csv", tests_dir / "hppc_40C.csv"]
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_identify_writes_a_set_the_bms_loads_with_its_provenance(tests_dir, identified):
    out, stdout = identified
    assert re.search(r"capacity 4\.9\d\d Ah", stdout) and "9 temperatures (0, 5, " in stdout
    cell = load_cell_params(out)
    assert cell.capacity_ah == pytest.approx(5.0, rel=5e-3)
    assert cell.impedance_at(0.5, 0.0)["r0_ohm"] == pytest.approx(
        CELL.impedance_at(0.5, 0.0)["r0_ohm"], rel=0.03
    )
    head = tomllib.loads((out / "params.toml").read_text())
    sources = {s["file"]: s for s in head["provenance"]["sources"]}
    for name in ("ocv.csv", "hppc_0C.csv", "hppc_40C.csv"):
        assert (
            sources[name]["sha256"] == hashlib.sha256((tests_dir / name).read_bytes()).hexdigest()
        )
    assert head["provenance"]["pulses_per_test"] == [9, 9]
    # A second run would overwrite: refused without --force.
    again = run_identify(out, tests_dir / "ocv.csv", [tests_dir / "hppc_0C.csv"])
    assert again.returncode == 2 and "use --force" in again.stderr


def test_identify_with_power_tests_writes_a_power_map(tests_dir, tmp_path):
    """Power tests at two temperatures give the set a power map, which the estimator then
    uses for its limits; the sources are in the provenance. At 40 degC the cycler stopped
    the 2 A discharge pulse at SOC 0.3 after 5 s: it counts only as far as it ran, and the
    summary names it."""
    for temp_c in (0.0, 40.0):
        data = power_test(CELL, temp_c, (0.8, 0.3), (2.0, 20.0), dt_s=1.0, rest_s=3600.0)
        if temp_c == 40.0:
            pulse = np.flatnonzero(data.current_a == -2.0)
            start_s = data.time_s[pulse[np.flatnonzero(np.diff(pulse) > 1)[0] + 1]]
            data.current_a[pulse[data.time_s[pulse] >= start_s + 5.0]] = 0.0
        write_test(tmp_path / f"power_{temp_c:g}C.csv", data)
    out = tmp_path / "set"
    powers = [tmp_path / "power_0C.csv", tmp_path / "power_40C.csv"]
    proc = run_identify(out, tests_dir / "ocv.csv", [tests_dir / "hppc_0C.csv"], powers)
    assert proc.returncode == 0, proc.stderr
    assert "power map over 2 SOC points x 2 temperatures x 2 currents up to 20 A" in proc.stdout
    cell = load_cell_params(out)
    assert cell.has_power_map
    head = tomllib.loads((out / "params.toml").read_text())
    assert head["power_table"] == "power.csv"
    roles = {s["file"]: s["role"] for s in head["provenance"]["sources"]}
    assert roles["power_0C.csv"] == roles["power_40C.csv"] == "power"
    assert head["provenance"]["power_test_temps_c"] == [0.0, 40.0]
    stopped = "power_40C.csv: SOC 0.30, discharge 2 A, stopped after 4 s"
    assert head["provenance"]["power_pulses_stopped"] == [stopped]
    assert "(1 power-test pulse(s) ended before 30 s away from the voltage limit" in proc.stdout
    assert stopped in proc.stdout
    hppc = [tests_dir / "hppc_0C.csv"]
    bad = run_identify(tmp_path / "refused", tests_dir / "ocv.csv", hppc, hppc)
    assert bad.returncode == 2 and "1 current(s); a power test needs at least two" in bad.stderr
    # power tests only warm, pulse tests cold too: the map would be extrapolated into the cold
    warm = run_identify(tmp_path / "warm", tests_dir / "ocv.csv", hppc, powers[1:])
    assert warm.returncode == 2
    assert "power tests (40 degC) do not span the pulse tests (0 degC)" in warm.stderr


def test_a_failed_identify_leaves_the_set_it_would_replace_untouched(tests_dir, tmp_path):
    good = tmp_path / "good"
    proc = run_identify(good, tests_dir / "ocv.csv", [tests_dir / "hppc_0C.csv"])
    assert proc.returncode == 0, proc.stderr
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    # A pulse test with too few pulses for the fit: refused even with --force.
    short = tmp_path / "short.csv"
    short.write_text("\n".join((tests_dir / "hppc_0C.csv").read_text().splitlines()[:3000]))
    proc = run_identify(good, tests_dir / "ocv.csv", [short], [], "--force")
    assert proc.returncode == 2 and "discharge pulse(s)" in proc.stderr
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "short.csv"]


def test_identify_names_what_is_wrong_with_the_data(tests_dir, tmp_path):
    flipped = write_test(tmp_path / "ocv_flipped.csv", ocv_test(CELL), current_sign=-1.0)
    proc = run_identify(tmp_path / "set", flipped, [tests_dir / "hppc_0C.csv"])
    assert proc.returncode == 2
    assert "ocv_flipped.csv: the voltage rises while the current is negative" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ocv_flipped.csv"]  # nothing half-made
    broken = tmp_path / "broken.csv"
    broken.write_text("time_s,current_a,voltage_v\n0,0,3.7\n")
    proc = run_identify(tmp_path / "s", broken, [broken])
    assert proc.returncode == 2 and "broken.csv: missing column(s) temp_c" in proc.stderr


@pytest.fixture(scope="module")
def drive_log(tmp_path_factory):
    """Two hours of a random drive at 10 degC (between the tests' 0 and 40) with 1 mV noise."""
    rng = np.random.default_rng(5)
    n = 7200
    current_a = np.clip(np.repeat(rng.normal(-1.2, 8.0, n // 10), 10), -20.0, 10.0)
    temp_c = np.full(n, 10.0)
    voltage_v, soc = ecm.simulate(CELL.tables, 5.0, 0.95, current_a, temp_c, np.ones(n))
    path = tmp_path_factory.mktemp("drive") / "drive.csv"
    write_columns(
        path,
        {
            "time_s": np.arange(n, dtype=float),
            "current_a": current_a,
            "voltage_v": voltage_v + rng.normal(0.0, 0.001, n),
            "temp_c": temp_c,
            "soc_true": soc,
        },
        DIGITS,
    )
    return path


def test_replay_estimates_scores_and_draws(identified, drive_log, tmp_path):
    out_dir, _ = identified
    est, png = tmp_path / "est.csv", tmp_path / "report.png"
    proc = run_bms(
        "replay", "--params", str(out_dir), "--input", str(drive_log), "--out", str(est),
        "--plot", str(png),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rmse, max_abs = map(float, re.search(r"RMSE ([\d.]+) %, max ([\d.]+) %", proc.stdout).groups())
    assert rmse < 1.0 and max_abs < 3.0
    with est.open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == [
        "time_s", "soc", "soc_std", "voltage_pred_v", "charge_limit_10s_a",
        "discharge_limit_10s_a",
    ]  # fmt: skip
    assert len(rows) == 7201
    assert abs(float(rows[1][1]) - 0.95) < 0.02  # started from the OCV of the first sample
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 30_000


def test_replay_from_a_wrong_start_converges(identified, drive_log, tmp_path):
    out_dir, _ = identified
    proc = run_bms(
        "replay", "--params", str(out_dir), "--input", str(drive_log),
        "--out", str(tmp_path / "est.csv"), "--initial-soc", "0.65",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with (tmp_path / "est.csv").open() as handle:
        soc = np.array([float(row["soc"]) for row in csv.DictReader(handle)])
    truth = np.genfromtxt(drive_log, delimiter=",", names=True)["soc_true"]
    assert np.abs(soc - truth)[600:].max() < 0.03


def test_replay_refuses_bad_input(identified, tmp_path):
    out_dir, _ = identified
    log = tmp_path / "log.csv"
    log.write_text("time_s,current_a,voltage_v,temp_c\n0,0,3.7,25\n1,0,3.7,25\n1,0,3.7,25\n")
    proc = run_bms("replay", "--params", str(out_dir), "--input", str(log), "--out", "x.csv")
    assert proc.returncode == 2 and "log.csv:4: time_s does not rise" in proc.stderr
    proc = run_bms(
        "replay", "--params", str(out_dir), "--input", str(log), "--out", "x.csv",
        "--initial-soc", "1.5",
    )  # fmt: skip
    assert proc.returncode == 2 and "--initial-soc must lie in [0, 1]" in proc.stderr
    proc = run_bms("replay", "--params", str(tmp_path), "--input", str(log), "--out", "x.csv")
    assert proc.returncode == 2 and "params.toml: cannot read" in proc.stderr
    nowhere = tmp_path / "no" / "est.csv"
    proc = run_bms("replay", "--params", str(out_dir), "--input", str(log), "--out", str(nowhere))
    assert proc.returncode == 2 and "cannot write" in proc.stderr and "Traceback" not in proc.stderr
