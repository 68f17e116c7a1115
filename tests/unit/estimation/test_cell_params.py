"""Parameter sets: tables over SOC x temperature, interpolation, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from bms.estimation.cell_params import CellParamsError, load_cell_params


def test_bilinear_lookup_reproduces_a_linear_table_and_clamps(linear):
    soc = np.array([0.1, 0.37, 0.8])
    temp_c = np.array([5.0, 20.0, 33.0])
    assert linear.ocv_at(soc, temp_c) == pytest.approx(3.0 + soc + 0.002 * temp_c)
    # Outside the grid: the edge value, never an extrapolation.
    assert linear.ocv_at(np.array([-0.2, 1.3]), 60.0) == pytest.approx([3.08, 4.08])
    assert linear.ocv_at(0.5, -30.0) == pytest.approx(3.5)
    r = linear.impedance_at(0.25, 10.0)
    assert r["r0_ohm"] == pytest.approx(0.01 + 0.0005 * 30.0)
    assert r["r1_ohm"] == pytest.approx(0.0125)
    assert linear.impedance_at(2.0, 99.0)["r0_ohm"] == pytest.approx(0.01)


def test_ocv_inverse_agrees_and_clamps(linear, generic):
    soc = np.linspace(0.0, 1.0, 41)
    assert linear.soc_at_ocv(linear.ocv_at(soc, 15.0), 15.0) == pytest.approx(soc, abs=1e-12)
    assert generic.soc_at_ocv(generic.ocv_at(soc)) == pytest.approx(soc, abs=1e-9)
    assert linear.soc_at_ocv(np.array([2.0, 9.0]), 20.0).tolist() == [0.0, 1.0]
    assert np.isnan(linear.soc_at_ocv(np.nan, 20.0))


def test_the_shipped_set_loads_with_its_provenance(generic):
    assert generic.capacity_ah == 5.0
    assert generic.tables.impedance.shape == (6, 6, 5)
    assert "hand" in generic.provenance["method"]
    cold, warm = generic.impedance_at(0.5, 0.0), generic.impedance_at(0.5, 25.0)
    assert cold["r0_ohm"] > 2 * warm["r0_ohm"]


@pytest.mark.parametrize(
    ("file", "text", "message"),
    [
        ("ocv.csv", "temp_c,soc,ocv_v\n25,0,3.5\n25,1,3.4\n", "must rise strictly"),
        ("ocv.csv", "temp_c,soc,ocv_v\n25,0.1,3.5\n25,1,3.9\n", "from 0 to 1"),
        ("ocv.csv", "temp_c,soc,ocv_v\n0,0,3.0\n0,1,4.0\n40,0,3.0\n", "not a full grid"),
        ("ocv.csv", "temp_c,soc,ocv_v\n25,0,3.0\n25,0,3.1\n25,1,4.0\n", "not a full grid"),
        ("ocv.csv", "temp_c,soc\n25,0\n", "missing column"),
        ("ocv.csv", "temp_c,soc,ocv_v\n25,0,x\n", r"ocv.csv:2: ocv_v is not a number"),
        ("ocv.csv", "temp_c,soc,ocv_v\n25,0,nan\n", "not finite"),
        ("ocv.csv", "temp_c,soc,ocv_v\n", "no data rows"),
        (
            "impedance.csv",
            "temp_c,soc,r0_ohm,r1_ohm,c1_f,r2_ohm,c2_f\n25,0,0.01,0.01,0,0.01,10\n"
            "25,1,0.01,0.01,10,0.01,10\n",
            "must be > 0",
        ),
        ("params.toml", 'name = "x"\ncapacity_ah = 2.0\n', "[ekf]: required section"),
        (
            "params.toml",
            'name = "x"\ncapacity_ah = 2.0\nvoltage_max_v = 4.0\nvoltage_min_v = 3.0\n[ekf]\n'
            "voltage_noise_v = 0.002\ncurrent_noise_a = 0.01\nsoc_random_walk_per_sqrt_h = 0.001\n"
            "rc_random_walk_v_per_sqrt_s = 0.0005\ninitial_soc_std = 0.05\n"
            "impedance_error_ratio = 0.05\n",
            "[ekf]: rc_random_walk_v_per_sqrt_s is replaced by polarisation_error_v",
        ),
    ],
)
def test_broken_sets_name_the_file_and_the_problem(linear_dir, file, text, message):
    (linear_dir / file).write_text(text)
    with pytest.raises(CellParamsError) as excinfo:
        load_cell_params(linear_dir)
    assert message in str(excinfo.value)
    assert file in str(excinfo.value)


def test_absent_set_is_a_clear_error(tmp_path):
    with pytest.raises(CellParamsError, match="cannot read"):
        load_cell_params(tmp_path / "absent")


def test_csv_from_a_spreadsheet_reads_and_errors_keep_their_line_numbers(tmp_path):
    from bms.csvio import CsvError, read_columns

    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftime_s,current_a\r\n0,1.5\r\n\r\n1,2.5\r\n\r\n".encode())
    data = read_columns(path, ("time_s", "current_a"))
    assert data["current_a"].tolist() == [1.5, 2.5]
    path.write_text("time_s,current_a\n0,1.5\n\n1,x\n")
    with pytest.raises(CsvError, match=r"excel.csv:4: current_a is not a number: 'x'"):
        read_columns(path, ("time_s", "current_a"))


def power_csv(rows: list[tuple[float, float, float, float, float]]) -> str:
    return "temp_c,soc,current_a,duration_s,overpotential_v\n" + "".join(
        ",".join(f"{v:g}" for v in row) + "\n" for row in rows
    )


def full_power_rows(eta=lambda temp_c, soc, amps, duration_s: 0.01 * abs(amps)):
    return [
        (temp_c, soc, amps, duration_s, eta(temp_c, soc, amps, duration_s))
        for temp_c in (0.0, 40.0)
        for soc in (0.0, 1.0)
        for amps in (-10.0, -1.0, 1.0, 10.0)
        for duration_s in (2.0, 10.0, 30.0)
    ]


def test_a_power_map_loads_in_the_kernel_layout(linear_dir):
    (linear_dir / "power.csv").write_text(
        power_csv(
            full_power_rows(
                lambda t, s, a, d: 0.001 * abs(a) + 0.0001 * d + 0.00001 * t + 0.05 * (a > 0) + 0.1
            )
        )
    )
    (linear_dir / "params.toml").write_text(
        (linear_dir / "params.toml")
        .read_text()
        .replace("[ekf]", 'power_table = "power.csv"\n\n[ekf]')
    )
    cell = load_cell_params(linear_dir)
    assert cell.has_power_map
    power_map = cell.power_map
    assert list(power_map.current_a) == [1.0, 10.0] and list(power_map.temp_c) == [0.0, 40.0]
    # direction 0 is discharge (-1 and -10 A), 1 charge; last axis the durations
    assert power_map.overpotential_v[1, 1, 0, 1, 2] == pytest.approx(0.01 + 0.003 + 0.0004 + 0.1)
    assert power_map.overpotential_v[0, 1, 1, 0, 0] == pytest.approx(0.001 + 0.0002 + 0.05 + 0.1)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (full_power_rows()[:-1], "not a full grid"),
        ([*full_power_rows(), full_power_rows()[0]], "not a full grid"),
        ([r for r in full_power_rows() if r[2] != -10.0], "same magnitudes"),
        ([r for r in full_power_rows() if r[3] != 30.0], "duration_s must be exactly"),
        ([(*r[:4], -r[4]) for r in full_power_rows()], "must be a number > 0"),
        (full_power_rows(lambda t, s, a, d: 1.0 / abs(a)), "must not fall"),
    ],
)
def test_broken_power_maps_name_the_problem(linear_dir, rows, message):
    (linear_dir / "power.csv").write_text(power_csv(rows))
    (linear_dir / "params.toml").write_text(
        (linear_dir / "params.toml")
        .read_text()
        .replace("[ekf]", 'power_table = "power.csv"\n\n[ekf]')
    )
    with pytest.raises(CellParamsError) as excinfo:
        load_cell_params(linear_dir)
    assert message in str(excinfo.value) and "power.csv" in str(excinfo.value)


def test_a_set_without_a_power_map_has_none(generic):
    assert not generic.has_power_map and generic.power_map.current_a.size == 0
