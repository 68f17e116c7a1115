"""A small two-temperature parameter set whose values the tests can compute by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from bms.estimation.cell_params import load_cell_params
from tests.conftest import REPO

GENERIC = REPO / "models" / "ecm" / "generic_nmc"

PARAMS_TOML = """\
name = "linear"
capacity_ah = 2.0
voltage_max_v = 4.0
voltage_min_v = 3.0

[ekf]
voltage_noise_v = 0.002
current_noise_a = 0.01
soc_random_walk_per_sqrt_h = 0.001
polarisation_error_v = 0.0001
initial_soc_std = 0.05
impedance_error_ratio = 0.05
"""


def write_linear_set(directory: Path) -> Path:
    """OCV = 3.0 + 1.0 * soc + 0.002 * (temp_c - 0) between 0 and 40 degC (linear in both, so
    bilinear interpolation must reproduce it exactly); R0 = 0.01 + 0.0005 * (40 - temp_c)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.toml").write_text(PARAMS_TOML)
    lines = ["temp_c,soc,ocv_v"]
    for temp_c in (0.0, 40.0):
        for soc in (0.0, 0.5, 1.0):
            lines.append(f"{temp_c},{soc},{3.0 + soc + 0.002 * temp_c}")
    (directory / "ocv.csv").write_text("\n".join(lines) + "\n")
    lines = ["temp_c,soc,r0_ohm,r1_ohm,c1_f,r2_ohm,c2_f"]
    for temp_c in (0.0, 40.0):
        for soc in (0.0, 1.0):
            r0 = 0.01 + 0.0005 * (40.0 - temp_c)
            lines.append(f"{temp_c},{soc},{r0},{0.01 + 0.01 * soc},100,0.02,2000")
    (directory / "impedance.csv").write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture
def linear_dir(tmp_path) -> Path:
    return write_linear_set(tmp_path / "linear")


@pytest.fixture
def linear(linear_dir):
    return load_cell_params(linear_dir)


@pytest.fixture(scope="session")
def generic():
    return load_cell_params(GENERIC)
