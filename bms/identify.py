"""``bms identify``: a parameter set from an OCV test and HPPC tests, with its provenance.

Reads the test CSVs (``time_s,current_a,voltage_v,temp_c``, current positive when charging),
fits them (bms/estimation/fitting.py), writes ``params.toml``, ``ocv.csv`` and
``impedance.csv`` (and ``power.csv`` from power tests) into the output directory, and loads
the result back through the same checks the service uses, so a set that this command writes
is one the BMS accepts.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from bms.csvio import read_columns, write_columns
from bms.estimation.cell_params import (
    IMPEDANCE_COLUMNS,
    POWER_COLUMNS,
    CellParams,
    load_cell_params,
)
from bms.estimation.fitting import (
    FitError,
    HppcFit,
    OcvFit,
    PowerFit,
    TestData,
    fit_hppc,
    fit_ocv,
    fit_power,
    impedance_grid,
    power_grid,
)
from bms.types import POWER_DURATIONS_S

TEST_COLUMNS = ("time_s", "current_a", "voltage_v", "temp_c")
POWER_TEMP_COVER_C = 5.0
"""How far inside the pulse tests' coldest and warmest temperatures the power tests may stop."""
DEFAULT_EKF = {
    "voltage_noise_v": 0.005,
    "current_noise_a": None,  # 1 % of 1C, set from the capacity
    "soc_random_walk_per_sqrt_h": 0.005,
    "polarisation_error_v": 0.002,
    "initial_soc_std": 0.05,
    "impedance_error_ratio": 0.1,
}
"""The EKF's noise model written into a new set: a starting point to tune (see the comments
in the file it writes)."""


def read_test(path: Path) -> TestData:
    """One test's CSV as arrays (CsvError when it cannot be read)."""
    columns = read_columns(path, TEST_COLUMNS)
    return TestData(Path(path).name, *(columns[name] for name in TEST_COLUMNS))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def identify(
    ocv_path: Path,
    hppc_paths: list[Path],
    out_dir: Path,
    name: str,
    force: bool = False,
    power_paths: list[Path] = (),
) -> CellParams:
    """Fit and write the set; raise CsvError or FitError for unusable data, CellParamsError
    for a set the service would refuse, FileExistsError rather than overwrite a set without
    ``force``, OSError where the directory cannot be written.

    The set is written and checked in a new directory beside ``out_dir`` and only then moved
    into place, so a failure leaves whatever was there before untouched.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists (use --force to replace it)")
    ocv = fit_ocv(read_test(ocv_path))
    hppc = [fit_hppc(read_test(path), ocv) for path in hppc_paths]
    power = [fit_power(read_test(path), ocv, POWER_DURATIONS_S) for path in power_paths]
    if power:
        _check_power_temperatures([fit.temp_c for fit in power], [fit.temp_c for fit in hppc])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        sources = (
            [("ocv", Path(ocv_path), ocv.temp_c)]
            + [("hppc", Path(path), fit.temp_c) for path, fit in zip(hppc_paths, hppc, strict=True)]
            + [
                ("power", Path(path), fit.temp_c)
                for path, fit in zip(power_paths, power, strict=True)
            ]
        )
        _write_set(staging, name, ocv, hppc, power, sources)
        load_cell_params(staging)
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            out_dir.rename(retired / out_dir.name)
            shutil.rmtree(retired)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_cell_params(out_dir)


def _check_power_temperatures(power_c: list[float], pulse_c: list[float]) -> None:
    """Refuse power tests that do not span the pulse tests' temperatures (within
    POWER_TEMP_COVER_C): the estimator runs wherever the impedance tables go, and the power
    map would be held at its own edge beyond them, optimistic in the cold."""
    if min(power_c) > min(pulse_c) + POWER_TEMP_COVER_C or max(power_c) < (
        max(pulse_c) - POWER_TEMP_COVER_C
    ):
        raise FitError(
            f"the power tests ({', '.join(f'{t:g}' for t in sorted(power_c))} degC) do not span "
            f"the pulse tests ({', '.join(f'{t:g}' for t in sorted(pulse_c))} degC): the state "
            "of power would be extrapolated there; add power tests at those temperatures"
        )


def _write_set(
    out_dir: Path,
    name: str,
    ocv: OcvFit,
    hppc: list[HppcFit],
    power: list[PowerFit],
    sources: list[tuple[str, Path, float]],
) -> None:
    soc_grid, temps, table = impedance_grid(hppc)
    write_columns(
        out_dir / "ocv.csv",
        {
            "temp_c": np.full(ocv.soc.size, ocv.temp_c),
            "soc": ocv.soc,
            "ocv_v": ocv.ocv_v,
        },
        {"temp_c": 1, "soc": 4, "ocv_v": 5},
    )
    grid_temp, grid_soc = np.meshgrid(temps, soc_grid, indexing="ij")
    columns = {"temp_c": grid_temp.ravel(), "soc": grid_soc.ravel()}
    columns |= {name: table[..., k].ravel() for k, name in enumerate(IMPEDANCE_COLUMNS)}
    write_columns(
        out_dir / "impedance.csv",
        columns,
        {"temp_c": 1, "soc": 2, "r0_ohm": 6, "r1_ohm": 6, "c1_f": 1, "r2_ohm": 6, "c2_f": 1},
    )
    if power:
        _write_power_map(out_dir / "power.csv", power)
    (out_dir / "params.toml").write_text(_params_toml(name, ocv, hppc, power, sources))


def _write_power_map(path: Path, power: list[PowerFit]) -> None:
    """The power tests on one grid, long form, current signed (positive charging)."""
    soc, temps, currents_a, table = power_grid(power)
    signed_a = np.concatenate((-currents_a[::-1], currents_a))
    # (temp, soc, direction, current, duration) -> (temp, soc, signed current, duration)
    by_signed = np.concatenate((table[:, :, 0, ::-1], table[:, :, 1]), axis=2)
    axes = np.meshgrid(temps, soc, signed_a, np.array(POWER_DURATIONS_S), indexing="ij")
    columns = dict(zip(POWER_COLUMNS[:4], (axis.ravel() for axis in axes), strict=True))
    columns["overpotential_v"] = by_signed.ravel()
    write_columns(
        path,
        columns,
        {"temp_c": 1, "soc": 3, "current_a": 3, "duration_s": 0, "overpotential_v": 6},
    )


def _toml_value(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for everything we write
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _params_toml(
    name: str,
    ocv: OcvFit,
    hppc: list[HppcFit],
    power: list[PowerFit],
    sources: list[tuple[str, Path, float]],
) -> str:
    ekf = dict(DEFAULT_EKF, current_noise_a=round(0.01 * ocv.capacity_ah, 4))
    try:
        version = metadata.version("pybms")
    except metadata.PackageNotFoundError:
        version = "unknown"
    lines = [
        f"# Cell parameter set {name!r}, identified by `bms identify` (pybms {version}).",
        "# Capacity and SOC come from the OCV test; the impedance tables from the pulse tests.",
        "# The [ekf] section is a generic starting point: tune it to the sensors in use.",
        "",
        f"name = {_toml_value(name)}",
        f"capacity_ah = {ocv.capacity_ah:.4f}",
        f"voltage_max_v = {ocv.voltage_max_v}",
        f"voltage_min_v = {ocv.voltage_min_v}",
        'ocv_table = "ocv.csv"',
        'impedance_table = "impedance.csv"',
        *(['power_table = "power.csv"'] if power else []),
        "",
        "[ekf]",
        *(f"{key} = {_toml_value(value)}" for key, value in ekf.items()),
        "",
        "[provenance]",
        'tool = "bms identify"',
        f"pybms_version = {_toml_value(version)}",
        f"created_utc = {_toml_value(_utc_now())}",
        f"command = {_toml_value(' '.join(sys.argv))}",
        f"ocv_test_temp_c = {ocv.temp_c}",
        f"ocv_half_gap_v = {ocv.hysteresis_v:.5f}",
        f"pulse_test_temps_c = {_toml_value([fit.temp_c for fit in hppc])}",
        f"pulse_fit_rms_v = {_toml_value([round(fit.rms_v, 6) for fit in hppc])}",
        f"pulses_per_test = {_toml_value([len(fit.pulses) for fit in hppc])}",
    ]
    if power:
        lines += [
            f"power_test_temps_c = {_toml_value([fit.temp_c for fit in power])}",
            f"power_pulses_per_test = {_toml_value([fit.pulses for fit in power])}",
            # ended short of the longest duration away from the limit: kept as far as they ran
            f"power_pulses_stopped = {_toml_value(_stopped_pulses(power, sources))}",
        ]
    for role, path, temp_c in sources:
        lines += [
            "",
            "[[provenance.sources]]",
            f"role = {_toml_value(role)}",
            f"file = {_toml_value(path.name)}",
            f"sha256 = {_toml_value(sha256_of(path))}",
            f"temp_c = {temp_c}",
        ]
    return "\n".join(lines) + "\n"


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(cell: CellParams) -> str:
    """A few lines for the person who ran the command."""
    t = cell.tables
    rms = ", ".join(f"{v * 1e3:.2f}" for v in cell.provenance["pulse_fit_rms_v"])
    return (
        f"{cell.name}: capacity {cell.capacity_ah:.3f} Ah, {cell.voltage_min_v:g}-"
        f"{cell.voltage_max_v:g} V, OCV over {t.ocv_soc.size} SOC points at "
        f"{cell.provenance['ocv_test_temp_c']:g} degC (charge/discharge half-gap "
        f"{cell.provenance['ocv_half_gap_v'] * 1e3:.1f} mV), impedance over "
        f"{t.imp_soc.size} SOC points x {t.imp_temp_c.size} temperatures "
        f"({', '.join(f'{v:g}' for v in t.imp_temp_c)} degC), pulse fit rms {rms} mV"
        + (
            f", power map over {cell.power_map.soc.size} SOC points x "
            f"{cell.power_map.temp_c.size} temperatures x {cell.power_map.current_a.size} "
            f"currents up to {cell.power_map.current_a[-1]:g} A"
            + _stopped_note(cell.provenance.get("power_pulses_stopped", []))
            if cell.has_power_map
            else ""
        )
    )


def _stopped_pulses(power: list[PowerFit], sources: list[tuple[str, Path, float]]) -> list[str]:
    """Each power-test pulse that stopped away from the limit, named for the person who ran
    the test (they may want to run it again)."""
    files = [path.name for role, path, _ in sources if role == "power"]
    return [
        f"{name}: SOC {soc:.2f}, {('discharge', 'charge')[direction]} {amps:g} A, "
        f"stopped after {lasted_s:g} s"
        for name, fit in zip(files, power, strict=True)
        for soc, direction, amps, lasted_s in fit.stopped
    ]


def _stopped_note(stopped: list[str]) -> str:
    if not stopped:
        return ""
    return (
        f" ({len(stopped)} power-test pulse(s) ended before {POWER_DURATIONS_S[-1]:g} s away"
        " from the voltage limit, as if stopped, and count only as far as they ran: "
        + "; ".join(stopped)
        + ")"
    )
